"""The on-disk layout of a run's checkpoints, the manifest that vouches for one, and atomic file moves.

    RUN/checkpoints/
      latest                  text file naming the newest complete checkpoint ("step_000123")
      step_000123/
        manifest.json         written last: files, sizes, sha256, step, world size, config hashes
        config.yaml           the resolved job config of the run that wrote it
        trainer_state.pt      client state: step, data cursor, curriculum stage, scheduler ...
        rng/rank_00000.pt     Python, NumPy, torch CPU and CUDA generator states, one file per rank
        deepspeed/ | dcp/       what the engine writes (ZeRO files; DCP files of DDP and FSDP2;
                                `model_optim.pt` in DDP checkpoints of caduceus-dist 0.1)
      step_000123.tmp/        a save in progress (or a crashed one; removed at the next start)
      preempted.json          written when the ranks agreed to stop for a requeue (exit 75): which job
                              attempt, at which step, and what `latest` named then (docs/resume.md §7)

A directory without a manifest, or whose files do not match it, is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import caduceus_dist
from caduceus_dist.fsio import atomic_write, file_mismatch, fsync_path

CHECKPOINTS = "checkpoints"  # RUN/checkpoints
MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "caduceus-dist-checkpoint"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".trash"
PREEMPTED = "preempted.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (by name; validity is checked separately), oldest first."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found)


def list_leftovers(root: Path) -> list[Path]:
    """Directories of saves that crashed (`.tmp`) or deletions that were interrupted (`.trash`)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith((TMP_SUFFIX, TRASH_SUFFIX)))


def read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def relative_files(directory: Path) -> list[str]:
    """Every regular file under `directory`, as sorted POSIX paths relative to it (the manifest excluded)."""
    files = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(directory).as_posix()
            if rel != MANIFEST:
                files.append(rel)
    return sorted(files)


def fsync_dirs(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_path(Path(dirpath))


def move_to_trash(path: Path) -> Path | None:
    """Rename a directory to `NAME.trash` (instant): it stops being a checkpoint before any byte is deleted,
    and a deletion that a crash interrupts leaves a `.trash` directory that the next start removes."""
    if not path.exists():
        return None
    if path.name.endswith(TRASH_SUFFIX):
        return path
    trash = path.with_name(path.name + TRASH_SUFFIX)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    return trash


def remove_tree(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves a half-deleted checkpoint behind a valid name."""
    trash = move_to_trash(path)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def build_manifest(
    *, step: int, world_size: int, engine: dict, files: dict[str, dict], config_hash: str, model_config: dict
) -> dict:
    """`engine`: the settings that decide the stored format (name, precision, ZeRO stage; see engine_settings)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"caduceus-dist {caduceus_dist.__version__}",
        "created_unix": time.time(),
        "step": step,
        "world_size": world_size,
        "engine": engine["name"],
        "engine_config": engine,
        "config_hash": config_hash,
        "model_config": model_config,
        "total_bytes": sum(entry["bytes"] for entry in files.values()),
        "files": dict(sorted(files.items())),
    }


def read_manifest(directory: Path) -> dict:
    """The manifest of `directory`; raises ValueError naming the file when it is missing or unreadable."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (no such checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (the save did not finish)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest['format_version']}; this caduceus-dist reads up to "
            f"{FORMAT_VERSION} (upgrade caduceus-dist)"
        )
    return manifest


def check_files(directory: Path, expected: dict[str, dict], names: list[str], verify: str) -> list[str]:
    """Problems with the files `names` of a checkpoint (empty list: they match the manifest)."""
    problems = []
    for name in names:
        want = expected[name]
        mismatch = file_mismatch(directory / name, want["bytes"], want["sha256"], verify)
        if mismatch is None:
            continue
        what, size = mismatch
        problems.append({"missing": f"{name}: missing",
                         "size": f"{name}: {size} bytes, manifest says {want['bytes']}",
                         "sha256": f"{name}: sha256 differs from the manifest (corrupt)"}[what])
    return problems


# ---------------------------------------------------------------------------------------------------
# The preemption record: how a batch script knows "requeue me" without trusting the exit code. On a
# multi-node job the first node to exit 75 gets the others killed by srun (--kill-on-bad-exit), and
# srun then reports their code, not 75.


def job_attempt() -> dict[str, str]:
    """The scheduler job and attempt of this process (empty outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


def record_preemption(root: Path, step: int, reason: str) -> None:
    """Rank 0, once the ranks agreed to stop with exit 75 (after the collective save, if it succeeded)."""
    record = {"step": step, "latest": read_latest(root), "reason": reason, "job": job_attempt(),
              "time_unix": time.time()}
    atomic_write(root / PREEMPTED, json.dumps(record, indent=1) + "\n")


def clear_preemption(root: Path) -> None:
    (root / PREEMPTED).unlink(missing_ok=True)


def preemption_verdict(root: Path) -> tuple[bool, str]:
    """(requeue?, why): did this job attempt stop on an agreed preemption, with `latest` still naming the
    checkpoint it saved? Decided from the run's own files only."""
    try:
        record = json.loads((root / PREEMPTED).read_text())
    except FileNotFoundError:
        return False, f"no {root / PREEMPTED}: the run did not stop for a requeue"
    except (OSError, ValueError) as err:
        return False, f"{root / PREEMPTED} is unreadable ({err})"
    if record.get("job") != job_attempt():
        return False, f"{root / PREEMPTED} belongs to another job attempt ({record.get('job')})"
    latest = read_latest(root)
    if latest != record.get("latest"):
        return False, f"`latest` names {latest}, not {record.get('latest')} as at the preemption"
    if latest is not None and not (root / latest / MANIFEST).is_file():
        return False, f"{root / latest} has no {MANIFEST}"
    where = f"resumes from {latest}" if latest else "starts again (no checkpoint yet)"
    return True, f"the ranks stopped at step {record['step']} ({record['reason']}); the requeued job {where}"
