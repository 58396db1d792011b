"""The SLURM launchers on a real SLURM (two slurmd nodes on this host, see tests/slurm_cluster.py).

Every job trains the cpu_demo recipe shrunk by overrides on 2 nodes x 1 process. The uninterrupted
sbatch run is the reference: a run preempted mid-way (sbatch and Submitit paths), requeued by the
launcher and resumed from `latest` must end with bitwise the same model and optimizer state.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_checkpoint import read_ddp_checkpoint
from slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "slurm" / "pretrain.sh"
MAX_STEPS = 150  # long enough (seconds) that a forwarded signal repeated every second lands in training
TINY = ["model.d_model=32", "model.n_layer=1", "data.seq_len=128", "data.curriculum.start_seq_len=null",
        "data.tokens_per_step=512", "data.num_workers=0",
        "train.eval_batches=0", "train.deterministic=true", "checkpoint.every=0", "checkpoint.keep=3",
        "logging.log_every=1", f"train.max_steps={MAX_STEPS}"]
STEP_LINE = re.compile(r"^step\s+(\d+)/", re.MULTILINE)
JOB_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def shards(embedded_sample_shards) -> Path:
    """The embedded sample, sharded once for every job."""
    return embedded_sample_shards


class Jobs:
    """Submits jobs to the test cluster and cancels whatever is left of them at the end."""

    def __init__(self, cluster):
        self.env = {**cluster.env(), "CADUCEUS_HOME": str(REPO), "CADUCEUS_PYTHON": sys.executable,
                    "FORWARD_EVERY": "5"}
        self.ids: list[str] = []

    def sbatch(self, workdir: Path, *args: str, options: tuple[str, ...] = ("--time=10", "--signal=B:USR2@60"),
               **env: str) -> tuple[str, Path]:
        done = subprocess.run(
            ["sbatch", "--parsable", "--gpus-per-node=0", *options, f"--output={workdir}/job-%j.out",
             str(SBATCH_SCRIPT), *args],
            cwd=workdir, env={**self.env, **env}, capture_output=True, text=True, check=True)
        job_id = done.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        return job_id, workdir / f"job-{job_id}.out"

    def launch(self, workdir: Path, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "caduceus_dist.launch", *args], cwd=workdir,
                              env={**self.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
        self.ids.append(job_id)
        return job_id

    def show(self, job_id: str) -> dict[str, str]:
        text = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=self.env, capture_output=True,
                              text=True, check=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_done(self, job_id: str, log: Path) -> dict[str, str]:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            info = self.show(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(2)
        pytest.fail(f"job {job_id} still {info['JobState']} after {JOB_TIMEOUT_S} s; log:\n{read(log)}")

    def signal_at_step(self, job_id: str, log: Path, step: int, batch: bool) -> None:
        """Send USR2 once the job has logged `step` (0: as soon as the batch script has started):
        to the batch shell (sbatch) or to every process of the job's steps (Submitit)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            text = read(log)
            steps = [int(s) for s in STEP_LINE.findall(text)]
            if (steps and max(steps) >= step) or (step == 0 and "SLURM_RESTART_COUNT=0" in text):
                target = ["--batch"] if batch else []
                subprocess.run(["scancel", *target, "--signal=USR2", job_id], env=self.env, check=True)
                return
            assert self.show(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), read(log)
            time.sleep(0.5)
        pytest.fail(f"job {job_id} never reached step {step}; log:\n{read(log)}")

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], env=self.env, capture_output=True)


@pytest.fixture(scope="module")
def jobs(slurm_cluster):  # noqa: F811
    submitted = Jobs(slurm_cluster)
    yield submitted
    submitted.cancel_all()


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} not written>"


def final_state(run_dir: Path) -> tuple[int, dict]:
    """(step, {model, optimizer}) of the checkpoint `latest` points to."""
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = read_ddp_checkpoint(latest)
    step = int(re.search(r"(\d+)$", latest.name).group(1))
    return step, {"model": state["model"], "optimizer": state["optim"]}


def assert_bitwise_equal(actual, expected, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs (max |diff| {(actual - expected).abs().max()})"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({event.step: event.value for event in acc.Scalars("train/loss")})
    return losses


def preempted_checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                  if p.is_dir() and int(p.name.split("_")[1]) < MAX_STEPS)


@pytest.fixture(scope="module")
def reference(jobs, shards, tmp_path_factory):
    """The uninterrupted sbatch run: 2 nodes x 1 process, cpu_demo shrunk to MAX_STEPS steps."""
    workdir = tmp_path_factory.mktemp("slurm-reference")
    run_dir = workdir / "run"
    job_id, log = jobs.sbatch(workdir, "cpu_demo", f"run_dir={run_dir}", f"data.shards={shards}", *TINY)
    info = jobs.wait_done(job_id, log)
    return job_id, info, log, run_dir


def test_sbatch_cpu_demo_completes_on_two_nodes_and_loss_falls(reference):
    _, info, log, run_dir = reference
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "0" and info["NodeList"] == "n[1-2]", info
    assert "SLURM_RESTART_COUNT=0 nodes=n[1-2] (2) mode=cpu procs/node=1" in text
    assert "world 2 on cpu" in text
    losses = tensorboard_losses(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)), sorted(losses)
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(MAX_STEPS - 4, MAX_STEPS + 1)]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, f"loss did not fall: first {first}, last {last}"
    assert final_state(run_dir)[0] == MAX_STEPS


def test_sbatch_usr2_checkpoints_requeues_and_resumes_bitwise(jobs, shards, reference, tmp_path):
    """The signal arrives while the trainers are still starting (SLURM's pre-timeout signal can come a
    minute early): they ignore it until their handlers are in, the batch shell repeats it, and the
    ranks save together at their first step boundary after that."""
    run_dir = tmp_path / "run"
    # Repeat the forwarded signal every second: at the 30 s default a quiet machine finishes the
    # 40 steps before the first repeat reaches the (now listening) trainers, and nothing is preempted.
    job_id, log = jobs.sbatch(tmp_path, "cpu_demo", f"run_dir={run_dir}", f"data.shards={shards}", *TINY,
                              FORWARD_EVERY="1")
    jobs.signal_at_step(job_id, log, step=0, batch=True)
    info = jobs.wait_done(job_id, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    first_run = text.split("SLURM_RESTART_COUNT=1 ", 1)[0]
    assert first_run.index("received SIGUSR2: forwarding it") < first_run.index("caduceus-dist: engine"), first_run
    assert re.search(r"(checkpoint saved \(exit 75\): |srun exited with \d+, but )the ranks stopped at step", text)
    assert f"requeueing job {job_id}; the next run resumes from latest" in text
    assert "SLURM_RESTART_COUNT=0 " in text
    preempted = preempted_checkpoint_steps(run_dir)
    assert len(preempted) == 1 and 1 <= preempted[0] < MAX_STEPS, preempted
    assert f"resumed at step {preempted[0]}" in text
    # the resumed run logged each remaining step once, and no step before the checkpoint again
    second_run = text.split("SLURM_RESTART_COUNT=1 ", 1)[1]
    assert [int(s) for s in STEP_LINE.findall(second_run)] == list(range(preempted[0] + 1, MAX_STEPS + 1))
    step, state = final_state(run_dir)
    ref_step, ref_state = final_state(reference[3])
    assert step == ref_step == MAX_STEPS
    assert_bitwise_equal(state, ref_state, "final state")


def test_sbatch_requeues_when_srun_kills_a_late_node_after_the_preemption(jobs, shards, reference, tmp_path):
    """Node 1's launcher ends a minute after its trainer: node 0 exits 75 first, srun kills node 1
    (--kill-on-bad-exit) and reports that, not 75. The script reads the run's own record instead."""
    run_dir = tmp_path / "run"
    job_id, log = jobs.sbatch(tmp_path, "cpu_demo", f"run_dir={run_dir}", f"data.shards={shards}", *TINY,
                              FORWARD_EVERY="1", CADUCEUS_PYTHON=str(REPO / "tests" / "late_teardown_python.sh"),
                              REAL_PYTHON=sys.executable)
    jobs.signal_at_step(job_id, log, step=5, batch=True)
    info = jobs.wait_done(job_id, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    first_run = text.split("SLURM_RESTART_COUNT=1 ", 1)[0]
    srun_code = re.search(r"srun exited with (\d+), but the ranks stopped at step (\d+)", first_run)
    assert srun_code and srun_code.group(1) != "75", first_run  # the race happened, and was recognised
    preempted = preempted_checkpoint_steps(run_dir)
    assert preempted == [int(srun_code.group(2))], preempted
    assert f"resumed at step {preempted[0]}" in text
    step, state = final_state(run_dir)
    assert step == MAX_STEPS
    assert_bitwise_equal(state, final_state(reference[3])[1], "final state")


def test_submitit_preemption_requeues_and_resumes_bitwise(jobs, shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    job_id = jobs.launch(
        tmp_path, "--config", str(REPO / "recipes" / "cpu_demo.yaml"), "--nodes", "2", "--gpus-per-node", "0",
        "--tasks-per-node", "1", "--time", "10", "--grace", "60", "--folder", str(tmp_path / "submitit"),
        f"run_dir={run_dir}", f"data.shards={shards}", *TINY)
    log = tmp_path / "submitit" / f"{job_id}_0_log.out"
    jobs.signal_at_step(job_id, log, step=5, batch=False)  # what SLURM sends before the time limit
    info = jobs.wait_done(job_id, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert "waiting for the trainer's collective checkpoint" in text
    assert "trainer exited with 75: requeueing" in text
    assert "SLURM_RESTART_COUNT=1:" in text
    preempted = preempted_checkpoint_steps(run_dir)
    assert len(preempted) == 1 and 5 <= preempted[0] < MAX_STEPS, preempted
    assert f"resumed at step {preempted[0]}" in text
    step, state = final_state(run_dir)
    assert step == MAX_STEPS
    assert_bitwise_equal(state, final_state(reference[3])[1], "final state")
    assert "Job completed successfully" in text


def test_sbatch_bad_config_fails_once_without_requeue(jobs, shards, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = jobs.sbatch(tmp_path, "cpu_demo", f"run_dir={run_dir}", f"data.shards={shards}",
                              "train.max_stepz=5")
    info = jobs.wait_done(job_id, log)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    assert info["ExitCode"] == "2:0", info  # the trainer's config-error code, through torchrun and srun
    assert "unknown key 'train.max_stepz'" in text and "config error" in text
    assert "not a preemption (cannot read the run's config: " in text and "so the job is not requeued" in text
    assert text.count("SLURM_RESTART_COUNT=") == 1
    assert not (run_dir / "checkpoints").exists()


def test_sbatch_unknown_recipe_fails_before_starting_anything(jobs, tmp_path):
    """Also: the script's #SBATCH defaults apply, and SLURM's SBATCH_* variables override them."""
    job_id, log = jobs.sbatch(tmp_path, "no_such_recipe", options=(), SBATCH_TIMELIMIT="7",
                              SBATCH_PARTITION="debug")
    info = jobs.wait_done(job_id, log)
    text = read(log)
    assert (info["TimeLimit"], info["Partition"], info["NumNodes"], info["Requeue"]) == ("00:07:00", "debug", "2", "1")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    assert "recipes/no_such_recipe.yaml not found (recipes: " in text and "cpu_demo" in text
    assert "srun" not in text
