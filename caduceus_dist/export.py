"""Export a training checkpoint as a Hugging Face model directory that transformers loads.

    python -m caduceus_dist.export RUN [--step N] --out DIR

RUN is a run directory (its `latest` checkpoint, or `--step N`), one checkpoint directory, or a Hugging
Face directory in the reference layout (a published Caduceus checkpoint: it gets our remote code). A
training checkpoint is verified against its manifest, loaded by the engine that wrote it at world size
1 (the engines reshard: DeepSpeed through a universal checkpoint, FSDP2 through DCP) and consolidated
to fp32. DIR receives config.json, model.safetensors (docs/reference-model.md §10) and the remote
code of docs/inference.md §1; the weights are read back and compared tensor by tensor before the
command reports success.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from caduceus_dist.checkpoint.manifest import (
    CHECKPOINTS,
    MANIFEST,
    check_files,
    list_checkpoints,
    read_latest,
    read_manifest,
    step_dir_name,
)


class ExportError(RuntimeError):
    """The run or checkpoint cannot be exported (the message names the path and what to do)."""


def find_checkpoint(run: Path, step: int | None) -> Path:
    """The checkpoint directory that `RUN [--step N]` names."""
    if not run.is_dir():
        raise ExportError(f"{run} is not a directory; pass a run directory, a checkpoint directory or a "
                          "Hugging Face model directory")
    if (run / MANIFEST).exists():
        if step is not None:
            raise ExportError(f"{run} is a single checkpoint directory; --step only applies to a run directory")
        return run
    root = run / CHECKPOINTS
    available = [path.name for _, path in list_checkpoints(root)]
    if not available:
        raise ExportError(f"no checkpoints under {root} (is {run} a run directory of caduceus-dist?)")
    if step is not None:
        name = step_dir_name(step)
        if name not in available:
            raise ExportError(f"{root} has no checkpoint for step {step}; available: {', '.join(available)}")
        return root / name
    latest = read_latest(root)
    if latest is None:
        raise ExportError(f"{root} has no `latest` pointer (no save finished); pass --step N, one of: "
                          f"{', '.join(available)}")
    return root / latest


def verified_manifest(path: Path) -> dict:
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        raise ExportError(f"cannot export {path}: {exc}") from None
    problems = check_files(path, manifest["files"], sorted(manifest["files"]), "sha256")
    if problems:
        raise ExportError(f"cannot export {path}: it does not match its manifest: {'; '.join(problems)}; "
                          "export an earlier step with --step N")
    return manifest


def checkpoint_job_config(path: Path):
    """The job config the checkpoint was written with (schema-checked, not re-validated against the
    data on this machine: exporting must work where the training shards are absent)."""
    from omegaconf import OmegaConf

    from caduceus_dist.config import JobConfig

    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(path / "config.yaml"))
    cfg = OmegaConf.to_object(merged)
    cfg.engine.device = "cpu"
    cfg.model.backend = "auto"
    cfg.model.gradient_checkpointing = False
    return cfg


def consolidate(path: Path, manifest: dict) -> tuple[object, dict[str, torch.Tensor]]:
    """(CaduceusConfig, fp32 state dict) via the engine that wrote the checkpoint, at world size 1."""
    from caduceus_dist.distributed import init_distributed
    from caduceus_dist.engine import build_engine
    from caduceus_dist.model import CaduceusForMaskedLM

    cfg = checkpoint_job_config(path)
    ctx = init_distributed(cfg.engine.device)
    if ctx.world_size != 1:
        raise ExportError("run the export as a single process (python -m caduceus_dist.export ...), not under a launcher")
    engine = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx)
    with warnings.catch_warnings():  # DCP's note that it loads in a single process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        engine.load_checkpoint(path, int(manifest["world_size"]))
    return cfg.model, engine.full_state_dict()


def is_hf_directory(path: Path) -> bool:
    from caduceus_dist.model.hf_io import CONFIG_NAME

    return (path / CONFIG_NAME).is_file() and not (path / MANIFEST).exists()


def from_hf_directory(path: Path) -> tuple[object, str]:
    """(model, description) of a Hugging Face directory in the reference layout."""
    from caduceus_dist.model import CaduceusForMaskedLM

    try:
        return CaduceusForMaskedLM.from_pretrained(path), f"{path} (Hugging Face layout)"
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot export {path}: {exc}") from None


def from_training_checkpoint(run: Path, step: int | None) -> tuple[object, str]:
    from caduceus_dist.model import CaduceusForMaskedLM
    from caduceus_dist.model.hf_io import load_hf_state_dict

    path = find_checkpoint(run, step)
    manifest = verified_manifest(path)
    model_config, state = consolidate(path, manifest)
    model = CaduceusForMaskedLM(model_config)
    load_hf_state_dict(model, state, source=str(path))
    return model, (f"{path} (step {manifest['step']}, engine {manifest['engine']}, saved by "
                   f"{manifest['world_size']} rank(s))")


def load_model(run: Path, step: int | None = None) -> tuple[object, str]:
    """(CaduceusForMaskedLM in fp32, description) of RUN [--step N]: a Hugging Face directory, a run directory
    or one checkpoint directory (what the export and the inference commands accept)."""
    if not is_hf_directory(run):
        return from_training_checkpoint(run, step)
    if step is not None:
        raise ExportError(f"{run} is a Hugging Face model directory; --step only applies to a run directory")
    return from_hf_directory(run)


def export(run: Path, out: Path, step: int | None = None) -> Path:
    from caduceus_dist.model import CaduceusForMaskedLM
    from caduceus_dist.model.hf_io import write_hub_code

    model, described = load_model(run, step)
    if out.resolve() == run.resolve():
        raise ExportError(f"--out {out} is the input directory; choose another --out")
    model.save_pretrained(out)
    write_hub_code(out)
    reloaded = CaduceusForMaskedLM.from_pretrained(out).state_dict()
    for name, tensor in model.state_dict().items():
        wrong_dtype = tensor.is_floating_point() and reloaded[name].dtype != torch.float32
        if wrong_dtype or not torch.equal(reloaded[name], tensor):
            raise ExportError(f"{out}: tensor {name} does not read back identically; the export is not usable")
    n_params = sum(t.numel() for t in model.parameters())
    print(f"exported {described} -> {out}: {n_params:,} fp32 parameters; load with transformers' "
          f"AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory, one checkpoint directory, or a Hugging Face directory")
    parser.add_argument("--step", type=int, default=None, help="export this step instead of `latest`")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (config.json, model.safetensors, transformers remote code)")
    args = parser.parse_args(argv)
    try:
        export(args.run, args.out, args.step)
    except ExportError as exc:
        print(f"export error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from caduceus_dist.distributed import exit_process

    exit_process(main())
