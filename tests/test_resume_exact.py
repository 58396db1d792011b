"""Exact stop-and-go resume with real processes: a 2-rank run killed with SIGKILL at a random step and
restarted with the same command ends bitwise identical to an uninterrupted run (parameters, optimizer
state, RNG streams, data cursor) and logs identical losses for every step after the resume (DeepSpeed
ZeRO-2 and FSDP2, fp32, CPU). On CPU this holds with torch's default algorithms; the runs use them,
which is the stronger claim. Also holds the launch helpers the other multi-process checkpoint tests use.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "recipes" / "pretrain.py"
MAX_STEPS = 8
EVERY = 3
ENGINES = {
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.name=fsdp2"],
}
IGNORED = {"config.yaml"}  # names the run directory, which differs between the runs
_STRAIGHT_RUNS: dict[str, Path] = {}  # engine -> uninterrupted 2-rank run (shared by the resume tests)


def port() -> int:
    """A TCP port free now (each launch of a test gets its own rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_shards(tmp_path_factory) -> Path:
    """The embedded sample genome, sharded once per session."""
    out = tmp_path_factory.getbasetemp() / "sample_shards"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_genome.py"), "--out", str(out), "--quiet"],
                       check=True, cwd=REPO)
    return out


def overrides(run_dir: Path, shards: Path, engine: str, *extra: str) -> list[str]:
    """A tiny model on the sample genome with a curriculum (32 -> 64 after step 4), checkpoints every 3 steps,
    two DataLoader workers per rank (preemption signals reach them too; cluster issue, item 4)."""
    return [
        f"run_dir={run_dir}", f"data.shards={shards}", "data.seq_len=64", "data.tokens_per_step=256",
        "data.num_workers=2", "data.verify=size", "data.curriculum.start_seq_len=32",
        "data.curriculum.stage_steps=4", "model.d_model=16", "model.n_layer=2", f"train.max_steps={MAX_STEPS}",
        "train.eval_batches=0", "logging.log_every=1",
        "logging.peak_flops_per_device=1e9", f"checkpoint.every={EVERY}", "checkpoint.keep=0",
        *ENGINES[engine], *extra,
    ]


class Job:
    """`world` real rank processes of recipes/pretrain.py on one gloo rendezvous (the env a launcher sets)."""

    def __init__(self, world: int, args: list[str], log_dir: Path, port: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(world)]
        self.procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
            with open(self.logs[rank], "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(PRETRAIN), "--config", str(REPO / "recipes" / "cpu_demo.yaml"), *args],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job timed out after {timeout} s; rank 0 said:\n{self.output()[-3000:]}")

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if any(proc.poll() is not None for proc in self.procs):
                break
            time.sleep(0.01)
        self.kill()
        pytest.fail(f"never saw {pattern!r}; rank 0 said:\n{self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        for proc in self.procs:
            proc.wait(timeout=60)

    def check(self, timeout: float = 240, expect: int = 0) -> str:
        codes = self.wait(timeout)
        if codes != [expect] * len(codes):
            details = "\n".join(f"--- rank {r} (exit {c}):\n{self.output(r)[-2500:]}" for r, c in enumerate(codes))
            pytest.fail(f"exit codes {codes}, expected {expect} on every rank\n{details}")
        return self.output()


@pytest.fixture
def jobs():
    """Start jobs through this; whatever is still running when the test ends is killed."""
    started: list[Job] = []

    def start(*args, **kwargs) -> Job:
        job = Job(*args, **kwargs)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()


def printed_losses(output: str) -> dict[int, str]:
    """step -> the loss as the console printed it (the last occurrence wins)."""
    return {int(s): loss for s, loss in re.findall(r"step\s+(\d+)/\d+ \| loss (\S+)", output)}


def tensorboard_losses(run_dir: Path) -> list[dict[int, float]]:
    """train/loss per step of each TensorBoard file of the run (one file per launch, oldest first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    out = []
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        out.append({event.step: event.value for event in acc.Scalars("train/loss")})
    return out


def checkpoint_contents(directory: Path) -> dict[str, object]:
    """Every file the manifest lists, loaded: torch files as objects, a DCP directory as one state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    listed = json.loads((directory / "manifest.json").read_text())["files"]
    contents: dict[str, object] = {}
    for rel in sorted(set(listed) - IGNORED):
        path = directory / rel
        if path.name == ".metadata":  # a DCP checkpoint: compare what it holds, not how it is laid out
            converted = directory.parent / f".{directory.name}.dcp.pt"
            dcp_to_torch_save(path.parent, converted)
            contents[path.parent.relative_to(directory).as_posix()] = torch.load(converted, weights_only=False)
            converted.unlink()
        elif path.suffix in (".pt", ".bin"):
            contents[rel] = torch.load(path, weights_only=False, map_location="cpu")
        elif path.suffix != ".distcp":
            contents[rel] = path.read_bytes()
    return contents


def differences(a: object, b: object, where: str = "") -> list[str]:
    """Paths at which two loaded checkpoints differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}/{key}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, type):
        return differences(vars(a), vars(b), where)  # e.g. DeepSpeed's loss scaler object
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def straight_run(engine: str, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run of `engine` (computed once per session)."""
    if engine not in _STRAIGHT_RUNS:
        shards = sample_shards(tmp_path_factory)
        run_dir = tmp_path_factory.mktemp(f"straight_{engine}")
        job = Job(2, overrides(run_dir, shards, engine), run_dir / "logs", port())
        job.check()
        _STRAIGHT_RUNS[engine] = run_dir
    return _STRAIGHT_RUNS[engine]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_sigkill_at_random_step_then_resume_is_bitwise_exact(engine, tmp_path, tmp_path_factory, jobs):
    straight = straight_run(engine, tmp_path_factory)
    shards = sample_shards(tmp_path_factory)
    kill_at = random.Random().randint(EVERY + 1, MAX_STEPS - 2)  # >= 2 steps of margin for the kill to land
    print(f"killing the {engine} run once it has printed step {kill_at}")
    run_dir = tmp_path / "run"
    args = overrides(run_dir, shards, engine)
    victim = jobs(2, args, run_dir / "logs_1", port())
    victim.wait_for(rf"step\s+{kill_at}/{MAX_STEPS}")
    victim.kill(signal.SIGKILL)
    reached = max(printed_losses(victim.output()))
    assert reached < MAX_STEPS
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    # the kill may land inside the save of a due step: then that step was never committed
    assert latest in {f"step_{EVERY * (reached // EVERY - k):06d}" for k in (0, 1)}, (reached, latest)

    output = jobs(2, args, run_dir / "logs_2", port()).check()
    resumed_at = int(re.search(r"resumed at step (\d+)", output).group(1))
    assert f"step_{resumed_at:06d}" == latest

    # identical losses after the resume: console (rounded) and TensorBoard (float32, every step)
    expected = printed_losses(straight_output := (straight / "logs" / "rank0.log").read_text())
    got = printed_losses(output)
    assert sorted(got) == list(range(resumed_at + 1, MAX_STEPS + 1))
    assert got == {step: expected[step] for step in got}, straight_output[-1500:]
    (straight_tb,) = tensorboard_losses(straight)
    resumed_tb = tensorboard_losses(run_dir)[-1]
    assert resumed_tb == {step: straight_tb[step] for step in range(resumed_at + 1, MAX_STEPS + 1)}

    # bitwise identical end state: parameters, optimizer moments, RNG streams, data cursor
    final = f"checkpoints/step_{MAX_STEPS:06d}"
    want, have = checkpoint_contents(straight / final), checkpoint_contents(run_dir / final)
    assert sorted(have) == sorted(want)
    assert differences(want, have) == []
