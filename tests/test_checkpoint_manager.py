"""CheckpointManager in one process with the real DDP engine and a tiny Caduceus: layout, manifest,
exact resume, fallback past corrupt or incomplete checkpoints, config mismatch, retention, resume
modes, preemption, async saves, RNG round trip. The multi-process behaviour is in test_resume_*.py
and test_preemption.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from caduceus_dist.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, rng
from caduceus_dist.checkpoint.manifest import preemption_verdict, read_latest, relative_files
from caduceus_dist.config import JobConfig
from caduceus_dist.distributed import DistContext
from caduceus_dist.engine import build_engine
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

CKPT_LOG = "caduceus_dist.checkpoint"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A one-process gloo group on an in-memory store: nothing leaks into the environment of other tests."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_cfg(max_steps: int = 6, **checkpoint) -> JobConfig:
    cfg = JobConfig()
    cfg.model = CaduceusConfig(d_model=16, n_layer=1, vocab_size=12)
    cfg.engine.name, cfg.engine.device = "ddp", "cpu"
    cfg.train.max_steps = max_steps
    cfg.checkpoint = CheckpointConfig(**{"every": 2, "keep": 0, **checkpoint})
    return cfg


class Run:
    """A training run of the tiny model whose batches draw on the Python, NumPy and torch generators,
    so that an inexact RNG restore changes the losses."""

    def __init__(self, run_dir: Path, cfg: JobConfig):
        self.cfg = cfg
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        self.engine = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx)
        self.manager = CheckpointManager(cfg, run_dir, self.engine)
        try:
            client = self.manager.resume()
        except CheckpointError:
            self.manager.preemption.close()  # the tests that expect this error must not leak its signal handlers
            raise
        self.step = client["step"] if client else 0
        self.resumed = client

    def train(self, until: int) -> dict[int, float]:
        losses = {}
        while self.step < until:
            ids = torch.randint(7, 11, (2, 32))
            keep = np.random.rand(2, 32) < 0.15 + 0.1 * random.random()
            targets = torch.where(torch.from_numpy(keep), ids, torch.full_like(ids, 4))
            out = self.engine.train_step([{"input_ids": ids, "targets": targets}], lr=1e-2).reduce()
            self.step += 1
            losses[self.step] = out["loss"]
            if self.manager.after_step(self.step, lambda: {"step": self.step, "cursor": 1000 + self.step}):
                break
        return losses

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.engine.module.state_dict().items()}

    def close(self) -> None:
        self.manager.close()


def ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_save_writes_verified_layout(tmp_path):
    run = Run(tmp_path, make_cfg())
    run.train(6)
    run.close()
    assert ckpts(tmp_path) == ["step_000002", "step_000004", "step_000006"]
    assert read_latest(tmp_path / "checkpoints") == "step_000006"
    directory = tmp_path / "checkpoints" / "step_000006"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1 and manifest["engine"] == "ddp"
    assert sorted(manifest["files"]) == relative_files(directory)
    assert {"config.yaml", "trainer_state.pt", "rng/rank_00000.pt", "dcp/.metadata", "dcp/__0_0.distcp"} <= set(
        manifest["files"])
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["model_config"]["d_model"] == 16
    assert torch.load(directory / "trainer_state.pt", weights_only=True) == {"step": 6, "cursor": 1006}


def test_resume_is_bitwise_exact(tmp_path):
    straight = Run(tmp_path / "a", make_cfg(every=3))
    expected = straight.train(6)
    final = straight.params()
    straight.close()

    crashed = Run(tmp_path / "b", make_cfg(every=3))
    crashed.train(5)  # dies after step 5 without closing: step 3 is the newest checkpoint
    crashed.manager.preemption.close()
    resumed = Run(tmp_path / "b", make_cfg(every=3))
    assert resumed.step == 3 and resumed.resumed["cursor"] == 1003
    losses = resumed.train(6)
    resumed.close()
    assert losses == {step: expected[step] for step in (4, 5, 6)}
    for name, tensor in resumed.params().items():
        assert torch.equal(tensor, final[name]), name


def _save_six(tmp_path: Path) -> Path:
    run = Run(tmp_path, make_cfg())
    run.train(6)
    run.close()
    return tmp_path / "checkpoints"


def test_corrupt_newest_falls_back_with_report(tmp_path, caplog):
    root = _save_six(tmp_path)
    engine_file = root / "step_000006" / "dcp" / "__0_0.distcp"
    data = bytearray(engine_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum can tell
    engine_file.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger=CKPT_LOG):
        run = Run(tmp_path, make_cfg())
    run.close()
    assert run.step == 4
    assert "step_000006 is incomplete or corrupt" in caplog.text
    assert "dcp/__0_0.distcp: sha256 differs from the manifest" in caplog.text
    assert "falling back to" in caplog.text and "step_000004" in caplog.text


def test_incomplete_newest_falls_back_with_report(tmp_path, caplog):
    root = _save_six(tmp_path)
    (root / "step_000006" / "rng" / "rank_00000.pt").unlink()
    (root / "step_000004" / "manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger=CKPT_LOG):
        run = Run(tmp_path, make_cfg())
    run.close()
    assert run.step == 2
    assert "rng/rank_00000.pt: missing" in caplog.text
    assert "step_000004/manifest.json is missing (the save did not finish)" in caplog.text


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    root = _save_six(tmp_path)
    for step in (2, 4, 6):
        (root / f"step_{step:06d}" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError) as err:
        Run(tmp_path, make_cfg())
    message = str(err.value)
    assert "failed verification" in message
    assert all(f"step_{step:06d}: trainer_state.pt" in message for step in (2, 4, 6))
    assert (root / "step_000006").is_dir()  # nothing was deleted


def test_different_model_config_lists_mismatched_keys(tmp_path, caplog):
    _save_six(tmp_path)
    cfg = make_cfg()
    cfg.model = CaduceusConfig(d_model=32, n_layer=2, vocab_size=12)
    with pytest.raises(CheckpointError) as err:
        Run(tmp_path, cfg)
    message = str(err.value)
    assert "different model configuration" in message
    assert "model.d_model (checkpoint 16, this run 32)" in message
    assert "model.n_layer (checkpoint 1, this run 2)" in message
    assert "vocab_size" not in message
    # runtime switches are not part of the architecture: they may change on resume; other changed
    # settings are only reported (and a tuple read back from YAML as a list is no change)
    cfg = make_cfg(max_steps=8)
    cfg.model.scan_chunk_size = 16
    with caplog.at_level(logging.INFO, logger=CKPT_LOG):
        run = Run(tmp_path, cfg)
    run.close()
    assert run.step == 6
    assert "resuming with changed settings: train.max_steps (checkpoint 6, this run 8)" in caplog.text
    assert "betas" not in caplog.text


def test_retention_keeps_last_k_plus_every_mth(tmp_path):
    run = Run(tmp_path, make_cfg(max_steps=10, every=1, keep=2, keep_every=4))
    run.train(10)
    run.close()
    assert ckpts(tmp_path) == ["step_000004", "step_000008", "step_000009", "step_000010"]


def test_resume_never_and_explicit_path(tmp_path):
    root = _save_six(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=never but .* already holds 3 checkpoint"):
        Run(tmp_path, make_cfg(resume="never"))
    run = Run(tmp_path, make_cfg(resume=str(root / "step_000002")))
    assert run.step == 2
    run.close()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Run(tmp_path, make_cfg(resume=str(root / "step_000099")))


def test_resuming_an_older_checkpoint_abandons_the_newer_ones(tmp_path, caplog):
    """After resuming step 2 explicitly, steps 4 and 6 belong to a discarded trajectory: `auto` must not
    pick them up again, and the run replaces them when it gets there."""
    root = _save_six(tmp_path)
    run = Run(tmp_path, make_cfg(resume=str(root / "step_000002"), every=1))
    run.train(3)
    run.close()
    assert read_latest(root) == "step_000003"
    with caplog.at_level(logging.INFO, logger=CKPT_LOG):
        again = Run(tmp_path, make_cfg())
    again.close()
    assert again.step == 3
    assert "ignoring step_000004, step_000006: newer than `latest`" in caplog.text


def test_interrupted_save_is_ignored_and_cleaned(tmp_path, caplog):
    root = _save_six(tmp_path)
    leftover = root / "step_000008.tmp"
    (leftover / "rng").mkdir(parents=True)
    (leftover / "model_optim.pt").write_bytes(b"half a file")
    with caplog.at_level(logging.INFO, logger=CKPT_LOG):
        run = Run(tmp_path, make_cfg())
    run.close()
    assert run.step == 6
    assert not leftover.exists()
    assert "step_000008.tmp, left by a save or deletion that was interrupted" in caplog.text


@pytest.mark.parametrize("async_save", [False, True])
def test_a_second_ctrl_c_mid_save_leaves_no_half_written_directory(tmp_path, monkeypatch, async_save):
    staging = tmp_path / "staging"
    run = Run(tmp_path, make_cfg(every=2, async_save=async_save, async_staging_dir=str(staging)))
    run.train(2)
    run.manager.wait()
    save_model = run.engine.save_checkpoint

    def pressed_midway(directory):  # the engine's files are on disk when the second press arrives
        save_model(directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(run.engine, "save_checkpoint", pressed_midway)
    with pytest.raises(KeyboardInterrupt):
        run.train(4)
    run.manager.preemption.close()
    assert ckpts(tmp_path) == ["step_000002"]  # no step_000004.tmp
    assert not (staging.exists() and list(staging.rglob("*.pt")))


@pytest.mark.parametrize(("name", "other"), [("SIGTERM", "SIGUSR2"), ("SIGUSR2", "SIGTERM")])
def test_preemption_signal_saves_and_requests_exit(tmp_path, name, other):
    sig, untouched = signal.Signals[name], signal.Signals[other]
    previous = signal.getsignal(sig), signal.getsignal(untouched)
    run = Run(tmp_path, make_cfg(every=100, preemption_signals=[name]))
    assert signal.getsignal(untouched) is previous[1]  # only the configured signals are taken
    run.train(2)
    assert ckpts(tmp_path) == []
    os.kill(os.getpid(), sig)  # the handler only sets a flag ...
    assert ckpts(tmp_path) == []
    losses = run.train(6)  # ... acted upon at the next step boundary
    assert list(losses) == [3]
    assert ckpts(tmp_path) == ["step_000003"] and read_latest(tmp_path / "checkpoints") == "step_000003"
    run.close()
    assert (signal.getsignal(sig), signal.getsignal(untouched)) == previous


@pytest.mark.parametrize("signame", ["SIGUSR2", "SIGINT"])
def test_a_preemption_leaves_the_record_a_batch_script_requeues_on(tmp_path, monkeypatch, signame):
    """slurm/pretrain.sh requeues on this record, not on srun's exit code (docs/resume.md §7)."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    root = tmp_path / "checkpoints"
    run = Run(tmp_path, make_cfg(every=100, preemption_signals=["SIGUSR2"]))
    run.train(2)
    assert preemption_verdict(root)[0] is False
    os.kill(os.getpid(), signal.Signals[signame])
    run.train(6)
    run.close()
    requeue, why = preemption_verdict(root)
    if signame == "SIGINT":  # Ctrl-C saves too, but is never requeued
        assert not requeue and "did not stop for a requeue" in why
        return
    assert requeue and why == ("the ranks stopped at step 3 (preemption signal); the requeued job resumes "
                               "from step_000003")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "belongs to another job attempt" in preemption_verdict(root)[1]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    (root / "latest").write_text("step_000001\n")
    assert preemption_verdict(root) == (False, "`latest` names step_000001, not step_000003 as at the preemption")
    (root / "latest").write_text("step_000003\n")
    (root / "step_000003" / "manifest.json").rename(root / "manifest.json.away")
    assert preemption_verdict(root) == (False, f"{root / 'step_000003'} has no manifest.json")
    (root / "manifest.json.away").rename(root / "step_000003" / "manifest.json")
    Run(tmp_path, make_cfg(every=100)).close()  # the next attempt starts: the record is spent
    assert not (root / "preempted.json").exists()


def test_async_save_gives_the_same_checkpoints_and_resume(tmp_path):
    sync = Run(tmp_path / "sync", make_cfg())
    sync.train(6)
    sync.close()
    staging = tmp_path / "staging"
    run = Run(tmp_path / "async", make_cfg(async_save=True, async_staging_dir=str(staging)))
    run.train(6)
    run.close()
    assert ckpts(tmp_path / "async") == ckpts(tmp_path / "sync")
    for step in (2, 4, 6):
        name = f"step_{step:06d}/manifest.json"
        sync_files = json.loads((tmp_path / "sync" / "checkpoints" / name).read_text())["files"]
        async_files = json.loads((tmp_path / "async" / "checkpoints" / name).read_text())["files"]
        del sync_files["config.yaml"], async_files["config.yaml"]  # differs by the async keys only
        # DCP's metadata records the directory it was written in (staging, or step_N.tmp)
        sync_meta, async_meta = (FileSystemReader(run / "checkpoints" / f"step_{step:06d}" / "dcp").read_metadata()
                                 for run in (tmp_path / "sync", tmp_path / "async"))
        assert sync_meta.state_dict_metadata == async_meta.state_dict_metadata
        del sync_files["dcp/.metadata"], async_files["dcp/.metadata"]
        assert async_files == sync_files  # byte-identical tensors, RNG and trainer-state files
    assert not [p for p in staging.rglob("*") if p.is_file()]  # the staging copies are freed
    (tmp_path / "async" / "checkpoints" / "step_000006" / "manifest.json").unlink()
    resumed = Run(tmp_path / "async", make_cfg(async_save=True, async_staging_dir=str(staging)))
    resumed.close()
    assert resumed.step == 4


def test_rng_round_trip_through_a_file(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    torch.save(rng.capture(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(5).tolist(), np.random.normal(), torch.rand(3).tolist())
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(7)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(5).tolist(), np.random.normal(), torch.rand(3).tolist()) == expected
    fresh_a, fresh_b = rng.fresh(1, 10, 2), rng.fresh(1, 10, 3)
    assert not torch.equal(fresh_a["torch"], fresh_b["torch"])
    assert torch.equal(rng.fresh(1, 10, 2)["torch"], fresh_a["torch"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"every": -1}, "checkpoint.every must be >= 0"),
        ({"on_write_error": "ignore"}, "checkpoint.on_write_error must be one of"),
        ({"preemption_signals": ["SIGFOO"]}, "checkpoint.preemption_signals: 'SIGFOO' is not a signal name"),
        ({"preemption_signals": ["SIGKILL"]}, "SIGKILL cannot be caught"),
        ({"verify": "md5"}, "checkpoint.verify must be one of"),
    ],
)
def test_bad_checkpoint_config_names_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        CheckpointConfig(**override).validate()


def test_hashing_is_shared_by_bytes_not_by_file_name():
    """A real checkpoint's shape: one big engine file and many small per-rank ones. Round-robin by name
    can give one rank the big file and half the small ones; sharing by bytes gives it the big file alone."""
    from caduceus_dist.fsio import balanced_shares

    sizes = {"model_optim.pt": 900, **{f"rng/rank_{r:05d}.pt": 16 for r in range(8)}, "trainer_state.pt": 2}
    for parts in (1, 2, 3, 8):
        shares = balanced_shares(sizes, parts)
        assert sorted(n for share in shares for n in share) == sorted(sizes)  # every file exactly once
        loads = [sum(sizes[n] for n in share) for share in shares]
        assert max(loads) <= max(max(sizes.values()), -(-sum(sizes.values()) // parts)) + max(
            s for s in sizes.values() if s < 900)  # the greedy bound: never more than one small file past even
        assert shares == balanced_shares(dict(reversed(list(sizes.items()))), parts)  # same split on every rank
    big = next(share for share in balanced_shares(sizes, 2) if "model_optim.pt" in share)
    assert big == ["model_optim.pt"]
    by_name = sorted(sizes)[0::2]  # the old rule on rank 0 of 2
    assert "model_optim.pt" in by_name and len(by_name) > 1


def test_retention_deletes_in_the_background_and_close_waits_for_it(tmp_path, monkeypatch):
    """Rank 0 applies retention while the other ranks wait: the rename that retires a checkpoint is
    immediate, the deletion of its bytes runs on another thread, and close() finishes it."""
    from caduceus_dist.checkpoint import retention

    deleted_on = []
    real = retention.shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):
        if Path(path).exists():  # real deletions (move_to_trash also clears a stale, absent .trash path)
            deleted_on.append((Path(path).name, threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", recording_rmtree)
    run = Run(tmp_path, make_cfg(max_steps=6, every=1, keep=2))
    run.train(6)
    run.close()
    assert ckpts(tmp_path) == ["step_000005", "step_000006"]  # nothing left behind, no .trash
    retired = [name for name, _ in deleted_on]
    assert retired == [f"step_{s:06d}.trash" for s in (1, 2, 3, 4)]
    assert {thread for _, thread in deleted_on} == {"checkpoint-retention"}
