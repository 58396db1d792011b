"""A checkpoint write that fails midway (a real full filesystem) leaves the previous checkpoint and
`latest` untouched; training goes on and retries, or stops with a clear message.

The full disk is a real one: a small tmpfs mounted over RUN/checkpoints (needs root; skipped with
the reason otherwise), and, anywhere, RLIMIT_FSIZE set after the first save, which makes the kernel
refuse writes past a size with EFBIG as a full quota does.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_checkpoint_manager import CKPT_LOG, Run, ckpts, make_cfg, process_group  # noqa: F401

from caduceus_dist.checkpoint import CheckpointWriteError
from caduceus_dist.checkpoint.manifest import check_files, read_latest, read_manifest

PAGE = 4096


def checkpoint_footprint(tmp_path: Path) -> int:
    """Bytes one checkpoint of the test model takes on tmpfs (files rounded up to pages, plus inodes)."""
    run = Run(tmp_path / "probe", make_cfg(max_steps=2))
    run.train(2)
    run.close()
    manifest = read_manifest(tmp_path / "probe" / "checkpoints" / "step_000002")
    return sum(-(-entry["bytes"] // PAGE) * PAGE for entry in manifest["files"].values())


@contextmanager
def full_disk(kind: str, run_dir: Path, footprint: int):
    """Yields a callable that makes the disk "fill up" once the first checkpoint is written."""
    if kind == "tmpfs":
        root = run_dir / "checkpoints"
        root.mkdir(parents=True)
        size = footprint * 3 // 2  # room for one checkpoint and half of the next
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
        try:
            yield lambda: None
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
    else:
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed

        def fill():
            resource.setrlimit(resource.RLIMIT_FSIZE, (footprint // 4, limits[1]))

        try:
            yield fill
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)


def assert_previous_intact(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    assert ckpts(run_dir) == ["step_000002"]  # no step_000004.tmp, no half checkpoint
    assert read_latest(root) == "step_000002"
    manifest = json.loads((root / "step_000002" / "manifest.json").read_text())
    assert check_files(root / "step_000002", manifest["files"], sorted(manifest["files"]), "sha256") == []


@pytest.mark.parametrize("kind", ["tmpfs", "rlimit"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_retry_keeps_previous_and_training_goes_on(tmp_path, caplog, kind, async_save):
    footprint = checkpoint_footprint(tmp_path)
    run_dir = tmp_path / "run"
    cfg = make_cfg(keep=1, async_save=async_save, async_staging_dir=str(tmp_path / "staging"))
    with full_disk(kind, run_dir, footprint) as fill, caplog.at_level(logging.INFO, logger=CKPT_LOG):
        run = Run(run_dir, cfg)
        run.train(2)
        run.manager.wait()  # the first checkpoint is sealed before the disk fills up
        fill()
        with pytest.raises(CheckpointWriteError) as err:  # the final save has no later retry: an error
            run.train(6)
        run.close()
        assert run.step == 6  # training went on past the failed save of step 4, up to the end
        assert_previous_intact(run_dir)
    (retried,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("caduceus_dist")]
    for step, text in ((4, retried), (6, str(err.value))):
        assert f"checkpoint step_{step:06d} could not be written" in text
        assert "rank 0" in text and " MB free on the filesystem of " in text  # who failed, how much room
        assert "The previous checkpoint (step_000002) and `latest` are unchanged" in text
    assert "Training continues and retries at the next interval" in retried
    assert "This was the final save" in str(err.value) and "redo the steps since step_000002" in str(err.value)


@pytest.mark.parametrize("kind", ["tmpfs", "rlimit"])
def test_full_disk_stop_fails_cleanly_with_the_reason(tmp_path, kind):
    footprint = checkpoint_footprint(tmp_path)
    run_dir = tmp_path / "run"
    with full_disk(kind, run_dir, footprint) as fill:
        run = Run(run_dir, make_cfg(keep=1, on_write_error="stop"))
        run.train(2)
        fill()
        with pytest.raises(CheckpointWriteError) as err:
            run.train(6)
        run.close()
        assert run.step == 4
        assert_previous_intact(run_dir)
    message = str(err.value)
    assert "checkpoint step_000004 could not be written" in message
    assert "Stopping (checkpoint.on_write_error=stop)" in message
    assert "rerun the same command to resume" in message


@pytest.mark.slow
@pytest.mark.distributed
def test_full_disk_during_a_two_rank_deepspeed_save_neither_hangs_nor_loses_the_previous(tmp_path, tmp_path_factory):
    """Both ranks write their ZeRO files into a filesystem that fills up midway; whichever rank fails,
    they agree, drop the partial save, train on to the end (where the final save fails too, so the run
    exits 1); `latest` still names the previous checkpoint, which still verifies."""
    from test_resume_exact import Job, overrides, port, sample_shards, straight_run

    probe = straight_run("zero2", tmp_path_factory) / "checkpoints" / "step_000003"
    manifest = read_manifest(probe)
    footprint = sum(-(-entry["bytes"] // PAGE) * PAGE for entry in manifest["files"].values())
    run_dir = tmp_path / "run"
    with full_disk("tmpfs", run_dir, footprint):
        job = Job(2, overrides(run_dir, sample_shards(tmp_path_factory), "zero2", "checkpoint.keep=1"),
                  tmp_path / "logs", port())
        output = job.check(timeout=300, expect=1)  # the final save failed too: a real failure, not 75
        root = run_dir / "checkpoints"
        assert read_latest(root) == "step_000003"
        assert ckpts(run_dir) == ["step_000003"]
        saved = read_manifest(root / "step_000003")
        assert check_files(root / "step_000003", saved["files"], sorted(saved["files"]), "sha256") == []
    assert "checkpoint step_000006 could not be written" in output
    assert "checkpoint step_000008 could not be written" in output and "This was the final save" in output
    assert "The previous checkpoint (step_000003) and `latest` are unchanged" in output
    assert "step      8/8" in output  # training went on to the end


@pytest.mark.parametrize("kind", ["tmpfs", "rlimit"])
def test_saves_that_keep_failing_stop_the_run_for_a_requeue(tmp_path, kind):
    """With on_write_error=retry a run must not train for hours without a checkpoint: after
    max_failed_saves failures in a row it stops with the error the entry point turns into exit 75."""
    from caduceus_dist.checkpoint import CheckpointSavesKeepFailing

    footprint = checkpoint_footprint(tmp_path)
    run_dir = tmp_path / "run"
    with full_disk(kind, run_dir, footprint) as fill:
        run = Run(run_dir, make_cfg(max_steps=20, keep=1, max_failed_saves=3))
        run.train(2)
        fill()
        with pytest.raises(CheckpointSavesKeepFailing) as err:
            run.train(20)
        run.close()
        assert run.step == 8  # saves at 4, 6 and 8 failed: the third stops the run, long before step 20
        assert_previous_intact(run_dir)
    message = str(err.value)
    assert "3 saves in a row failed (checkpoint.max_failed_saves=3)" in message
    assert "stopping with exit 75" in message and "resumes from step_000002" in message


def test_a_full_staging_dir_is_named_as_the_cause(tmp_path, caplog):
    """An asynchronous save stages in node-local memory; when that is what is full, the message says so
    (free space of the staging dir), not only 'free disk space'."""
    staging = tmp_path / "staging"
    staging.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(staging)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        run = Run(tmp_path / "run", make_cfg(max_steps=4, async_save=True, async_staging_dir=str(staging)))
        with caplog.at_level(logging.ERROR, logger=CKPT_LOG):
            try:
                run.train(2)  # the asynchronous save of step 2 does not fit in the staging dir
                run.manager.wait()
            finally:
                run.close()
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=False)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("caduceus_dist")]
    assert "checkpoint step_000002 could not be written" in message and f"staging in {staging}" in message
    assert f"MB free in checkpoint.async_staging_dir {staging} (node-local memory" in message
