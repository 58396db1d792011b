"""Resuming a run: which checkpoint, whether it is intact, whether it fits this run, and the RNG streams.

Every function here is collective where it says so (all ranks call it in the same order), so the ranks
always agree on the checkpoint they load (docs/resume.md §2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from caduceus_dist.checkpoint import rng
from caduceus_dist.checkpoint.manifest import (
    check_files,
    list_checkpoints,
    list_leftovers,
    read_latest,
    read_manifest,
    step_of,
)
from caduceus_dist.distributed import barrier, broadcast_object, gather_object
from caduceus_dist.fsio import balanced_shares

log = logging.getLogger("caduceus_dist.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run (the message says why and what to do)."""


def plain_config(cfg: Any) -> Any:
    """A job config (dataclass or OmegaConf) as plain dicts and lists."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return cfg


def hash_config(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, tuple):  # a live config keeps tuples; the same value read back from YAML is a list
        return {prefix: list(tree)}
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(saved: dict, current: dict, prefix: str) -> list[str]:
    """'key (checkpoint X, this run Y)' for every flattened key whose value differs."""
    old, new = _flatten(saved, prefix), _flatten(current, prefix)
    return [
        f"{key} (checkpoint {old.get(key, '<absent>')!r}, this run {new.get(key, '<absent>')!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, "<absent>") != new.get(key, "<absent>")
    ]


def remove_leftovers(root: Path, rank: int) -> None:
    """Rank 0 deletes the directories of saves or deletions that were interrupted."""
    if rank == 0:
        for leftover in list_leftovers(root):
            log.warning("removing %s, left by a save or deletion that was interrupted", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def auto_candidates(root: Path, rank: int) -> list[Path]:
    """Checkpoints up to the one `latest` names, newest first (later ones belong to an abandoned run)."""
    found = list_checkpoints(root)
    latest = read_latest(root)
    limit = step_of(Path(latest)) if latest else None
    if limit is not None:
        ignored = [path.name for step, path in found if step > limit]
        if ignored and rank == 0:
            log.warning(
                "ignoring %s: newer than `latest` (%s), so never committed by the run that continued; "
                "they are replaced when this run reaches their step", ", ".join(ignored), latest,
            )
        found = [(step, path) for step, path in found if step <= limit]
    return [path for _, path in reversed(found)]


def verify(path: Path, rank: int, world_size: int, mode: str) -> tuple[dict | None, list[str]]:
    """Collective: the manifest of `path` and its problems; the ranks share the hashing."""
    problems, manifest = [], None
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        problems.append(str(exc))
    problems = broadcast_object(problems)
    if problems:
        return None, problems
    sizes = {name: int(entry["bytes"]) for name, entry in manifest["files"].items()}
    mine = check_files(path, manifest["files"], balanced_shares(sizes, world_size)[rank], mode)
    problems = [problem for part in gather_object(mine) for problem in part]
    return manifest, problems


def select_checkpoint(root: Path, mode: str, rank: int, world_size: int, verify_mode: str) -> tuple[Path, dict] | None:
    """Collective: the checkpoint `checkpoint.resume` asks for, verified (falling back to older ones
    under `auto`), or None for a fresh start."""
    barrier()
    if mode == "never":
        found = list_checkpoints(root)
        if found:
            raise CheckpointError(
                f"checkpoint.resume=never but {root} already holds {len(found)} checkpoint(s) "
                f"(newest {found[-1][1].name}); use checkpoint.resume=auto to continue that run or a new run_dir"
            )
        return None
    if mode == "auto":
        candidates = auto_candidates(root, rank)
        if not candidates:
            if rank == 0:
                log.info("no checkpoint under %s: starting from step 0", root)
            return None
    else:
        candidates = [Path(mode)]
    rejected = []
    for path in candidates:
        manifest, problems = verify(path, rank, world_size, verify_mode)
        if not problems:
            break
        summary = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        rejected.append(f"{path}: {summary}")
        if rank == 0:
            log.warning("checkpoint %s is incomplete or corrupt, not used: %s", path, summary)
    else:
        what = "the checkpoint given by checkpoint.resume" if mode != "auto" else "any checkpoint"
        raise CheckpointError(
            f"cannot resume: {what} failed verification:\n  " + "\n  ".join(rejected)
            + "\nRestore the files, point checkpoint.resume at another checkpoint directory, "
            "or start a new run_dir."
        )
    if rejected and rank == 0:
        log.warning("falling back to %s (step %d), the newest valid checkpoint", path, manifest["step"])
    return path, manifest


def engine_settings(engine_cfg) -> dict:
    """The engine settings that decide a checkpoint's format, as the manifest records them."""
    settings = {"name": engine_cfg.name, "precision": engine_cfg.precision}
    if engine_cfg.name == "deepspeed":
        settings["zero_stage"] = engine_cfg.zero_stage
    return settings


# What may change between the run that saved a checkpoint and the run that resumes it (docs/resume.md §5):
# the number of ranks always; the precision where the stored state does not depend on it.
PRECISION_CHANGES_OK = {"fsdp2": {"fp32", "bf16", "fp16"}, "ddp": {"fp32", "bf16"}}
SUPPORTED_CHANGES = ("any number of ranks (every engine); engine.precision between fp32 and bf16 with fsdp2 or "
                     "ddp (and fp16 with fsdp2)")


def engine_mismatches(saved: dict, current: dict) -> list[str]:
    """Settings of `current` that cannot resume a checkpoint saved with `saved` (old manifests: the name only)."""
    if saved.get("name") != current["name"]:
        return [f"engine.name (checkpoint {saved.get('name')!r}, this run {current['name']!r})"]
    found = []
    if "zero_stage" in saved and saved["zero_stage"] != current.get("zero_stage"):
        found.append(f"engine.zero_stage (checkpoint {saved['zero_stage']}, this run {current.get('zero_stage')})")
    if "precision" in saved and saved["precision"] != current["precision"]:
        allowed = PRECISION_CHANGES_OK.get(current["name"], set())
        if not {saved["precision"], current["precision"]} <= allowed:
            found.append(f"engine.precision (checkpoint {saved['precision']!r}, this run {current['precision']!r})")
    return found


def check_compatible(path: Path, manifest: dict, model_config: dict, resolved_config: dict, config_hash: str,
                     rank: int, engine: dict) -> None:
    """Refuse a checkpoint of another architecture or engine format; log the other settings that changed."""
    saved_engine = manifest.get("engine_config") or {"name": manifest.get("engine")}
    mismatched_engine = engine_mismatches(saved_engine, engine)
    if mismatched_engine:
        raise CheckpointError(
            f"checkpoint {path} was saved in another engine format: {'; '.join(mismatched_engine)}. Supported on "
            f"resume: {SUPPORTED_CHANGES}. Resume with the checkpoint's engine settings, or start a new run_dir.")
    mismatched = differences(manifest.get("model_config", {}), model_config, "model")
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model configuration; mismatched keys:\n  "
            + "\n  ".join(mismatched)
            + "\nResume with the model settings of that run, or start a new run_dir."
        )
    if rank == 0 and manifest.get("config_hash") != config_hash:
        saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        current = {k: v for k, v in resolved_config.items() if k != "model"}
        changed = differences({k: v for k, v in saved.items() if k != "model"}, current, "")
        log.info("resuming with changed settings: %s", "; ".join(changed) or "none")


def restore_rng(path: Path, manifest: dict, rank: int, world_size: int, seed: int) -> None:
    """Each rank continues its own saved streams; on a world-size change, ranks that did not exist get
    fresh streams seeded from (train.seed, step, rank), and the streams of ranks that are gone end.
    The data order does not depend on these (it is a function of the data cursor)."""
    saved_world = int(manifest["world_size"])
    if rank < saved_world:
        rng.restore(torch.load(path / "rng" / f"rank_{rank:05d}.pt", weights_only=True))
    else:
        rng.restore(rng.fresh(seed, int(manifest["step"]), rank))
    if saved_world != world_size and rank == 0:
        log.warning(
            "world size changed %d -> %d: ranks below %d continue their saved RNG streams, the others start "
            "fresh ones seeded from (train.seed, step, rank); the data order is unchanged",
            saved_world, world_size, min(saved_world, world_size),
        )
