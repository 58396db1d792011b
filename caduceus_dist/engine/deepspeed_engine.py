"""DeepSpeed: ZeRO 0-3, bf16 / fp16 (dynamic loss scaling) / fp32, with a JSON generated from our config.

Our AdamW (reference parameter groups) is passed as a client optimizer and our LR schedule sets the
group learning rates before every step, so DeepSpeed owns neither; a user JSON that tries to
configure them is rejected rather than silently ignored.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from caduceus_dist.distributed import DistContext
from caduceus_dist.engine.base import TrainStepMixin, compile_blocks, fp32_cpu
from caduceus_dist.errors import ConfigError
from caduceus_dist.loss import MaskedLMLoss
from caduceus_dist.optim.adamw import build_optimizer

TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"
UNIVERSAL_DONE = ".conversion_complete"
OWNED_KEYS = ("optimizer", "scheduler")  # configured by optim.* and schedule.*
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedConfigError(ValueError):
    """The user DeepSpeed JSON conflicts with the job config; the message names the key."""


def deepspeed_json(job_cfg, world_size: int, micro_batch: int, n_params: int) -> dict:
    """The DeepSpeed config for this job: generated, then the user JSON (if any) merged on top.

    ZeRO communication buckets are sized to the model (DeepSpeed's default is 5e8 elements, 2 GB of
    fp32 buffers even for a tiny model, and NaN-filled on every allocation in deterministic mode).
    """
    grad_accum = job_cfg.train.grad_accum
    precision = job_cfg.engine.precision
    bucket = int(min(5e8, max(1e6, n_params)))
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": job_cfg.optim.grad_clip,
        "zero_optimization": {"stage": job_cfg.engine.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    user_path = job_cfg.engine.deepspeed_config
    if not user_path:
        return generated
    try:
        user = json.loads(Path(user_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeepSpeedConfigError(f"engine.deepspeed_config: cannot read {user_path}: {err}") from err
    for key in OWNED_KEYS:
        if key in user:
            raise DeepSpeedConfigError(
                f"{user_path}: key '{key}' is not allowed; the optimizer and LR schedule are set by "
                f"optim.* and schedule.* in the job config (remove '{key}' from the JSON)")
    for key in BATCH_KEYS:
        if key in user and user[key] != generated[key]:
            raise DeepSpeedConfigError(
                f"{user_path}: '{key}' = {user[key]} contradicts the job config ({generated[key]}, from "
                "data.tokens_per_step, the sequence length, train.grad_accum and the world size); remove it")
    return _deep_merge(generated, user)


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_cpu_comm_op() -> None:
    """Load DeepSpeed's CPU shared-memory all-reduce op before DeepSpeed does.

    DeepSpeed JIT-builds it behind torch's FileBaton, a `lock` file that a process killed at that moment
    (preemption, scancel, a timeout) leaves behind; every later run on the machine then waits on it
    forever. Here the build runs under a kernel flock instead, which dies with its holder, so a `lock`
    file found while holding it is stale and is removed. DeepSpeed then reuses the loaded module.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    with open(build_dir.parent / f"{builder.NAME}.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        if not (build_dir / f"{builder.NAME}.so").exists():
            print(f"DeepSpeed: compiling its CPU communication op once for this machine (about 20 s on an idle "
                  f"machine, minutes on a busy one; cached in {build_dir})", file=sys.stderr, flush=True)
        builder.load(verbose=False)


class DeepSpeedEngine(TrainStepMixin):
    name = "deepspeed"

    def __init__(self, job_cfg, model: torch.nn.Module, ctx: DistContext, micro_batch: int, loss: MaskedLMLoss):
        if ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger as ds_logger

        if job_cfg.engine.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ConfigError(f"engine.precision=fp16: DeepSpeed's '{get_accelerator()._name}' accelerator has no "
                              "fp16 support on this machine; use engine.precision=bf16 or fp32")

        ds_logger.setLevel(logging.WARNING)
        self.cfg = job_cfg.engine
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device
        self.loss = loss
        self.zero_stage = job_cfg.engine.zero_stage
        load_cpu_comm_op()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        if self.cfg.compile:
            compile_blocks(model)
        n_params = sum(p.numel() for p in model.parameters())
        self.config = deepspeed_json(job_cfg, self.world_size, micro_batch, n_params)
        optimizer = build_optimizer(model, job_cfg.optim)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.module = self.ds.module

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ds(ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # The loss is already normalised by the global target count (see engine/base.py).
        self.ds.backward(loss, scale_wrt_gas=False)
        if not last:
            self.ds.step()  # a no-op for DeepSpeed except counting the micro-step

    def _optimizer_step(self) -> torch.Tensor:
        manual = self.ds.zero_optimization_stage() == 0 and not (self.ds.bfloat16_enabled() or self.ds.fp16_enabled())
        norm = self._local_grad_norm() if manual else None  # plain optimizer: DeepSpeed keeps no norm
        self.ds.step()
        if norm is None:  # a tensor or a Python float, as DeepSpeed's optimizer wrapper keeps it
            norm = self.ds.get_global_grad_norm()
            if not isinstance(norm, torch.Tensor):
                norm = torch.tensor(norm, dtype=torch.float64, device=self.device)
        return norm

    def _local_grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def save_checkpoint(self, path: Path) -> None:
        """DeepSpeed's native save; a local write error is raised only after DeepSpeed's own barriers,
        so a full disk on one rank fails the save on that rank instead of hanging all the others."""
        errors: list[BaseException] = []
        native_writer = self.ds.checkpoint_engine
        self.ds.checkpoint_engine = _DeferredErrors(native_writer, errors)
        self.ds._copy_recovery_script = _DeferredErrors(self.ds, errors)._copy_recovery_script
        try:
            self.ds.save_checkpoint(str(path), tag=TAG, save_latest=False)
        finally:
            self.ds.checkpoint_engine = native_writer
            del self.ds._copy_recovery_script
        if errors:
            raise errors[0]

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        path = Path(path)
        partitioned_state = self.zero_stage > 0 or self.ds.bfloat16_enabled()
        if saved_world_size == self.world_size or not partitioned_state:
            self.ds.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False)
            return
        self._convert_to_universal(path)
        self.ds._config.load_universal_checkpoint = True
        try:
            self.ds.load_checkpoint(str(path), tag=UNIVERSAL_TAG, load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False

    def _convert_to_universal(self, path: Path) -> None:
        """ds_to_universal on rank 0 (once per checkpoint; --inject_missing_state for ZeRO 1/2)."""
        out = path / UNIVERSAL_TAG
        if self.rank == 0 and not (out / UNIVERSAL_DONE).exists():
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(path / TAG), "--output_folder", str(out), "--inject_missing_state"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"DeepSpeed universal conversion of {path / TAG} failed "
                                   f"(rc {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            (out / UNIVERSAL_DONE).touch()
        dist.barrier()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for param in self.module.parameters():  # every rank: the gathers are collective
            master = safe_get_full_fp32_param(param)
            full[id(param)] = fp32_cpu(param if master is None else master)
        # keep_vars maps tied names (embedding / LM head) to the same gathered tensor.
        return {name: full[id(tensor)] if id(tensor) in full else fp32_cpu(tensor)
                for name, tensor in self.module.state_dict(keep_vars=True).items()}


class _DeferredErrors:
    """Proxy whose write methods record an OSError/RuntimeError instead of raising it mid-protocol."""

    DEFERRED = ("save", "makedirs", "_copy_recovery_script")

    def __init__(self, target, errors: list[BaseException]):
        self._target, self._errors = target, errors

    def __getattr__(self, name: str):
        attribute = getattr(self._target, name)
        if name not in self.DEFERRED:
            return attribute

        def deferred(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except (OSError, RuntimeError) as err:
                self._errors.append(err)

        return deferred
