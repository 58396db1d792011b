"""The one training loop, shared by every engine.

Per optimizer step: take the step's micro-batches from the loader, set the LR from the schedule
(a pure function of the step), let the engine do forward/backward/update, and hand the step to the
checkpoint manager, which saves when due or when a preemption was agreed on (then the run exits with
code 75). Only every `logging.log_every` steps are the step's figures reduced across ranks and read
on the host (and throughput measured over the steps since the last report); the other steps never
wait for the device (docs/training.md, "What a step costs").
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from caduceus_dist.checkpoint.manager import CheckpointManager
from caduceus_dist.checkpoint.manifest import CHECKPOINTS, read_latest
from caduceus_dist.config import save_resolved
from caduceus_dist.data import DataPlanError, SequenceSlice, TrainStream, build_eval_loader
from caduceus_dist.data.mixture import DEFAULT_SOURCE
from caduceus_dist.distributed import (
    all_reduce,
    barrier,
    broadcast_object,
    choose_cpu_threads,
    init_distributed,
    ranks_on_this_host,
)
from caduceus_dist.engine import build_engine
from caduceus_dist.engine.base import StepResult
from caduceus_dist.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, ConfigError
from caduceus_dist.loss import EVAL_SUMS, MaskedLMLoss
from caduceus_dist.metrics.writer import (
    MetricsWriter,
    eval_line,
    eval_metrics,
    mixture_metrics,
    peak_flops,
    peak_memory_gib,
    train_line,
)
from caduceus_dist.model import CaduceusForMaskedLM, flops_per_token
from caduceus_dist.optim.schedule import lr_at


def _check_writable(run_dir: Path) -> None:
    """Fail at start-up, naming the key, if the run directory cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"run_dir: cannot write to {run_dir} ({err.strerror or err}); set run_dir= to a "
                          "directory you can write") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_finite(step: int, figures: dict[str, float]) -> None:
    if not math.isfinite(figures["loss"]):
        raise FloatingPointError(f"training loss is {figures['loss']} at step {step}; stopping (the last checkpoint "
                                 "is intact; lower optim.lr or use fp32/bf16)")


class _Window:
    """The steps since the last report: throughput is measured over them, so no step waits for the device.
    Evaluation and the time a checkpoint save blocked training are not training time (`excluded`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started, self.steps, self.tokens, self.data_wait = time.perf_counter(), 0, 0, 0.0
        self.excluded = 0.0

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.excluded

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens


class Trainer:
    """Builds everything from a validated JobConfig; `run()` returns the process exit code.

    `prepare_data(data_config)` runs on rank 0 before any rank opens the shards (the entry point uses it
    to shard the embedded sample on first use); the trainer itself knows nothing of shard preparation.
    """

    def __init__(self, cfg, prepare_data: Callable | None = None):
        self.cfg = cfg
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
            # That mode also NaN-fills every torch.empty to expose uninitialised reads: 50x slower
            # DeepSpeed steps on CPU, and no result changes.
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.ctx = init_distributed(cfg.engine.device, cfg.engine.cp)
        self.cp_slice = SequenceSlice(self.ctx.cp_rank, self.ctx.cp_size)
        self.threads, self.threads_reason = choose_cpu_threads(ranks_on_this_host())
        torch.set_num_threads(self.threads)
        if self.ctx.rank == 0 and prepare_data is not None:
            prepare_data(cfg.data)
        barrier()
        try:  # tokens_per_step / seq_len / world size / grad_accum must divide: fail before writing anything
            self.stream = TrainStream(cfg.data, self.ctx.dp_rank, self.ctx.dp_size, cfg.train.grad_accum,
                                      train_seed=cfg.train.seed, cp_slice=self.cp_slice)
        except DataPlanError as err:
            raise ConfigError(str(err) if str(err).startswith("data") else f"data: {err}") from None
        self.run_dir = Path(cfg.run_dir)
        seed_everything(cfg.train.seed)
        model = CaduceusForMaskedLM(cfg.model)
        if cfg.train.init_from and read_latest(self.run_dir / CHECKPOINTS) is None:
            self._initialise(model, cfg.train.init_from)
        # created only once the data plan and the initial weights are known to be good; every rank checks
        # (a failure on rank 0 alone would leave the others waiting)
        _check_writable(self.run_dir)
        self.engine = build_engine(cfg, model, self.ctx, self.stream.plan(0).micro_batch,
                                   MaskedLMLoss(cfg.loss.softmask_weight))
        self.eval_loaders = self._eval_loaders()
        self._batches = (batch for batch in ())  # the training stream once _train starts; closed on every way out
        self.manager = CheckpointManager(cfg, self.run_dir, self.engine)
        self.writer = MetricsWriter(cfg.logging, self.run_dir, self.ctx.rank)
        # Rank 0's figure for everyone, so all ranks report the same MFU.
        self.peak_flops, self.peak_reason = broadcast_object(peak_flops(cfg.logging, self.ctx.device))

    def _initialise(self, model: CaduceusForMaskedLM, source: str) -> None:
        """Every rank reads the weights of train.init_from (strict: names and shapes must match the recipe's model)."""
        from caduceus_dist.model.hf_io import load_weights

        try:
            load_weights(model, source)
        except (OSError, ValueError) as err:
            raise ConfigError(f"train.init_from: {err}") from None

    def _eval_loaders(self) -> dict:
        """Source name -> its validation stream. Empty with evaluation off (train.eval_batches=0); a source
        whose shards lack the split (sharded without held-out windows) gets one warning line instead of
        stopping the run."""
        cfg = self.cfg
        if cfg.train.eval_batches <= 0:
            return {}
        loaders = {}
        for name, split in zip(self.stream.names, self.stream.splits, strict=True):
            if split.manifest["splits"].get(cfg.train.eval_split, {}).get("windows", 0):
                loaders[name] = build_eval_loader(cfg.data, cfg.train.eval_split, self.ctx.dp_rank, self.ctx.dp_size,
                                                  cfg.train.eval_batches, cfg.train.seed, name, self.cp_slice)
            elif self.ctx.rank == 0:
                print(f"warning: {split.root} has no '{cfg.train.eval_split}' windows, so this run does not "
                      "validate on it (reshard with --valid-fraction 0.02 to hold some out, or set "
                      "train.eval_split; train.eval_batches=0 silences this)", flush=True)
        return loaders

    def run(self) -> int:
        """Train to train.max_steps; EXIT_OK, or EXIT_PREEMPTED after a preemption checkpoint."""
        try:
            return self._train()
        except BaseException:
            # Give the preemption signals back (in-process callers: tests, notebooks), but not close():
            # it is collective, and the other ranks may not reach it. Stop the data workers.
            self.manager.preemption.close()
            self._batches.close()
            raise

    def _train(self) -> int:
        cfg, engine = self.cfg, self.engine
        max_steps = cfg.train.max_steps
        eval_every = cfg.train.eval_every or max(1, max_steps // 5)
        client = self.manager.resume()
        if self.ctx.rank == 0:  # every check passed: this config can continue the run
            save_resolved(cfg, self.run_dir)
        step, consumed = 0, 0
        if client is not None:
            step, consumed = int(client["step"]), int(client["consumed_tokens"])
            self.stream.load_state_dict(client["data"])
            if step >= max_steps:
                self.writer.print(f"{self.run_dir} already finished: its checkpoint is at step {step} and "
                                  f"train.max_steps is {max_steps}, so there is nothing to do. Raise train.max_steps "
                                  "to train further, or set run_dir= for a new run")
                self.close()
                return EXIT_OK
            self.writer.print(f"resumed at step {step} from {self.run_dir}")
        self.writer.print(self._banner(step))
        if client is None and cfg.train.init_from:  # a fresh run: _initialise loaded these weights
            self.writer.print(f"starting from the weights of {cfg.train.init_from} (train.init_from)")
        self._batches = batches = self.stream.iterate(step)
        window = _Window()
        while step < max_steps:
            start = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - start
            if batch.step != step:
                raise RuntimeError(f"loader yielded step {batch.step} where the trainer expected step {step}")
            lr = lr_at(step, cfg.optim, cfg.schedule, max_steps)
            result = engine.train_step(batch.micro_batches, lr)
            step += 1
            consumed += batch.plan.tokens_per_step
            window.add(batch.plan.tokens_per_step)
            reported = step % cfg.logging.log_every == 0 or step == 1 or step == max_steps
            if reported:  # the only steps that read the step's figures on the host
                self._report(step, max_steps, result, lr, batch, consumed, window)
            if self.eval_loaders and (step % eval_every == 0 or step == max_steps):
                started = time.perf_counter()
                self.evaluate(step)
                window.excluded += time.perf_counter() - started

            def client_state(step=step, consumed=consumed, data=batch.state, result=result, reported=reported):
                if not reported:  # never save a model that has gone non-finite
                    _check_finite(step, result.reduce())
                return {"step": step, "data": data, "consumed_tokens": consumed}

            if self.manager.after_step(step, client_state):
                self.close()
                if self.manager.interrupted:
                    self.writer.print(f"stopped (Ctrl-C): checkpoint saved at step {step}; run the same command "
                                      "again to resume from it")
                    return EXIT_INTERRUPTED
                self.writer.print(f"preempted: checkpoint saved at step {step}; exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
            saved = self.manager.stats()  # non-empty at the steps that saved
            window.excluded += saved.get("checkpoint/blocking_s", 0.0)
            self.writer.scalars(step, saved)
        self.close()
        return EXIT_OK

    def _report(self, step: int, max_steps: int, result: StepResult, lr: float, batch, consumed: int,
                window: _Window) -> None:
        """Collective: reduce the step's figures and the window's timing (the slowest rank's), then log."""
        figures = result.reduce()
        _check_finite(step, figures)
        seconds, data_wait, memory = all_reduce([window.training_seconds(), window.data_wait,
                                                 peak_memory_gib(self.ctx.device)], self.ctx.device, op="max")
        tokens_per_s = window.tokens / seconds
        per_device = tokens_per_s / self.ctx.world_size
        plan = batch.plan
        metrics = {
            "train/loss": figures["loss"],
            "train/accuracy": figures["accuracy"],
            "train/grad_norm": figures["grad_norm"],
            "train/lr": lr,
            "train/n_targets": figures["n_targets"],
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": per_device,
            "perf/step_time_s": seconds / window.steps,
            "perf/data_wait_fraction": data_wait / seconds,
            "perf/peak_memory_gib": memory,
            "data/seq_len": plan.seq_len,
            "data/stage": plan.stage,
            "data/global_batch": plan.global_batch,
            "data/consumed_tokens": consumed,
        }
        if self.peak_flops is not None:  # an unknown GPU: MFU is not reported rather than guessed
            metrics["perf/mfu"] = flops_per_token(self.cfg.model, plan.seq_len) * per_device / self.peak_flops
        metrics["data/cursor_tokens"] = batch.state["tokens"]
        for name, source in batch.state["sources"].items():  # each genome's progress, in epochs
            metrics[f"data/epochs/{name}"] = source["epochs"]
        self.writer.scalars(step, metrics)
        self.writer.print(train_line(step, max_steps, metrics))
        window.reset()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation of every source; with several, per-source figures and their mixture-weighted total."""
        per_source = {name: self._evaluate_source(loader) for name, loader in self.eval_loaders.items()}
        names = tuple(per_source)
        if names == (DEFAULT_SOURCE,):
            metrics = eval_metrics("val", per_source[DEFAULT_SOURCE])
        else:
            weights = dict(zip(self.stream.names, self.stream.mixture.weights_at(step).tolist(), strict=True))
            metrics = {key: value for name in names for key, value in eval_metrics(f"val/{name}", per_source[name]).items()}
            metrics.update(mixture_metrics("val", metrics, names, weights))
        self.writer.scalars(step, metrics)
        self.writer.print(eval_line(step, metrics, () if names == (DEFAULT_SOURCE,) else names))
        return metrics

    def _evaluate_source(self, loader) -> dict[str, float]:
        sums = dict.fromkeys(EVAL_SUMS, 0.0)
        self.engine.module.eval()  # no layer of Caduceus behaves differently today; a future one (dropout) must not
        try:
            for batch in loader:
                for key, value in self.engine.eval_step(batch).items():
                    sums[key] += value
        finally:
            self.engine.module.train()
        return dict(zip(EVAL_SUMS, all_reduce([sums[key] for key in EVAL_SUMS], self.ctx.device), strict=True))

    def _banner(self, step: int) -> str:
        cfg, plan = self.cfg, self.stream.plan(step)
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        return (f"caduceus-dist: engine {cfg.engine.name} ({cfg.engine.precision}"
                f"{', ZeRO-' + str(cfg.engine.zero_stage) if cfg.engine.name == 'deepspeed' else ''})"
                f" | world {self.ctx.world_size} on {self.ctx.device.type} | model {n_params:,} params (local)"
                f" | L {plan.seq_len} x global batch {plan.global_batch} = {plan.tokens_per_step:,} tokens/step"
                f" (micro {plan.micro_batch} x accum {cfg.train.grad_accum} x {self.ctx.dp_size} data-parallel ranks)"
                + (f" | context parallel: {self.ctx.cp_size} ranks x {plan.seq_len // self.ctx.cp_size} positions"
                   if self.ctx.cp_size > 1 else "")
                + f" | steps {step}->{cfg.train.max_steps} | run_dir {self.run_dir}\n"
                f"  {self.threads} CPU thread(s) per rank ({self.threads_reason}); "
                + (f"MFU against {self.peak_flops / 1e9:,.0f} GFLOP/s per device ({self.peak_reason})"
                   if self.peak_flops is not None else self.peak_reason))

    def close(self) -> None:
        self._batches.close()
        self.manager.close()
        self.writer.close()
