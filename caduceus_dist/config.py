"""JobConfig: every component's typed config in one tree, loaded from a YAML recipe plus overrides.

    cfg = load_job_config("recipes/cpu_demo.yaml", ["train.max_steps=50", "engine.name=fsdp2"])

The schema is the dataclasses themselves (OmegaConf structured configs), so an unknown key, a value
of the wrong type or an inconsistent combination stops the job at start-up with a `ConfigError`
naming the key and where it came from, instead of failing (or being ignored) hours into a run.
Public override keys that scripts rely on: run_dir, train.max_steps, train.seed, engine.name,
data.shards, checkpoint.every, checkpoint.keep.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from caduceus_dist.checkpoint.config import CheckpointConfig
from caduceus_dist.data.config import DataConfig
from caduceus_dist.engine import ENGINES
from caduceus_dist.engine.config import DEVICES, PRECISION_NAMES, EngineConfig
from caduceus_dist.errors import ConfigError
from caduceus_dist.fsio import atomic_write
from caduceus_dist.loss.config import LossConfig
from caduceus_dist.metrics.config import LoggingConfig
from caduceus_dist.model.config import CaduceusConfig
from caduceus_dist.optim.config import OptimizerConfig, ScheduleConfig
from caduceus_dist.optim.schedule import SCHEDULES
from caduceus_dist.train.config import TrainConfig

RESOLVED_NAME = "config.yaml"
__all__ = ["RESOLVED_NAME", "ConfigError", "JobConfig", "load_job_config", "save_resolved", "validate"]


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    model: CaduceusConfig = field(default_factory=CaduceusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _first_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's own sentence, without its full_key / reference_type / object_type lines."""
    return str(err.msg or err).split("\n")[0].strip()


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        raise ConfigError(f"{source}: unknown key '{err.full_key}' ({_first_line(err)})") from None
    except ValidationError as err:
        if not err.full_key:  # a whole section given a plain value, e.g. engine=3
            raise ConfigError(f"{source}: this is a section, not a value; set its keys (e.g. engine.name=fsdp2), "
                              "or reset it to its defaults with SECTION={}") from None
        raise ConfigError(f"{source}: wrong type or value for '{err.full_key}': {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_first_line(err)}") from None


def _reset_section(merged, key: str, source: str):
    """`SECTION={}` on the command line: the section's defaults, not a merge that changes nothing
    (e.g. 'data.curriculum={}' turns a recipe's curriculum off)."""
    node = OmegaConf.select(merged, key, default=None)
    section_type = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
    if section_type is None or section_type is dict:
        raise ConfigError(f"{source}: '{key}' is not a config section (SECTION={{}} resets a section to its defaults)")
    OmegaConf.update(merged, key, OmegaConf.structured(section_type), merge=False)
    return merged


def _override_item(merged, key: str, value: str, source: str) -> None:
    """Set a key inside a list item (`data.sources[1].weight=0.5`): the index must exist; the value is typed
    as YAML, as every override is."""
    for match in re.finditer(r"\[(\d+)\]", key):
        prefix = key[:match.start()]
        items = OmegaConf.select(merged, prefix, default=None)
        if not OmegaConf.is_list(items):
            raise ConfigError(f"{source}: '{prefix}' is not a list")
        if int(match.group(1)) >= len(items):
            raise ConfigError(f"{source}: '{prefix}' has {len(items)} item(s), so index {match.group(1)} does not exist; "
                              f"set the whole list in the recipe to add one")
    try:
        OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"value={value}"]).value, merge=True)
    except ValidationError as err:
        raise ConfigError(f"{source}: wrong type or value for '{key}': {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: unknown key or bad value for '{key}': {_first_line(err)}") from None


def load_job_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Schema defaults, then the YAML recipe at `path`, then `key=value` overrides; validated."""
    merged = OmegaConf.structured(JobConfig)
    if path is not None:
        try:
            recipe = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"recipe {path} does not exist (recipes live in recipes/*.yaml)") from None
        except Exception as err:  # YAML syntax errors come from several libraries
            raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
        merged = _merge(merged, recipe, f"recipe {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key, _, value = item.partition("=")
        if value.strip() == "{}":
            merged = _reset_section(merged, key.strip(), f"override '{item}'")
            continue
        if "[" in key:  # an item of a list, e.g. data.sources[0].weight=2
            _override_item(merged, key.strip(), value, f"override '{item}'")
            continue
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"incomplete config: {err}") from None
    except ValueError as err:  # a component's own __post_init__ check (e.g. model.ssm_cfg keys)
        raise ConfigError(str(err)) from None
    if cfg.data.seed is None:
        cfg.data.seed = cfg.train.seed  # resolved here so the saved config states the data order
    validate(cfg)
    return cfg


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express; each message names the key(s)."""
    _require(cfg.engine.name in ENGINES, f"engine.name: '{cfg.engine.name}' is not one of {sorted(ENGINES)}")
    _require(cfg.engine.precision in PRECISION_NAMES,
             f"engine.precision: '{cfg.engine.precision}' is not one of {sorted(PRECISION_NAMES)}")
    _require(cfg.engine.zero_stage in (0, 1, 2, 3), f"engine.zero_stage: {cfg.engine.zero_stage} is not 0, 1, 2 or 3")
    _require(cfg.engine.device in DEVICES, f"engine.device: '{cfg.engine.device}' is not auto, cpu or cuda")
    _require(not (cfg.engine.name == "fsdp2" and cfg.engine.precision == "fp16"),
             "engine.precision=fp16 is not supported with engine.name=fsdp2 (use bf16, or the deepspeed/ddp engines)")
    _require(cfg.engine.deepspeed_config is None or cfg.engine.name == "deepspeed",
             f"engine.deepspeed_config is set but engine.name is '{cfg.engine.name}' (it only applies to deepspeed)")
    _require(cfg.engine.cp >= 1, f"engine.cp must be >= 1, got {cfg.engine.cp}")
    _require(cfg.engine.cp == 1 or cfg.engine.name != "deepspeed",
             f"engine.cp={cfg.engine.cp} is not supported with engine.name=deepspeed (DeepSpeed's sequence "
             "parallelism is for attention); use engine.name=fsdp2 or ddp for context parallelism")
    _require(cfg.model.d_inner % cfg.engine.cp == 0,
             f"engine.cp={cfg.engine.cp} must divide the Mamba inner width model.d_model x expand = "
             f"{cfg.model.d_inner} (each CP rank scans an equal slice of those channels)")
    _require(cfg.schedule.name in SCHEDULES, f"schedule.name: '{cfg.schedule.name}' is not one of {sorted(SCHEDULES)}")
    _require(0.0 <= cfg.schedule.warmup_fraction < 1.0,
             f"schedule.warmup_fraction must be in [0, 1), got {cfg.schedule.warmup_fraction}")
    _require(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    _require(cfg.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {cfg.optim.grad_clip}")
    _require(cfg.train.max_steps > 0, f"train.max_steps must be > 0, got {cfg.train.max_steps}")
    _require(cfg.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}")
    _require(cfg.train.eval_every >= 0, f"train.eval_every must be >= 0, got {cfg.train.eval_every}")
    _require(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1, got {cfg.logging.log_every}")
    for name in ("model", "data", "loss", "checkpoint"):
        component = getattr(cfg, name)
        if hasattr(component, "validate"):
            try:
                component.validate()
            except ValueError as err:
                message = str(err)
                raise ConfigError(message if message.startswith(f"{name}.") else f"{name}: {message}") from None


def save_resolved(cfg: JobConfig, run_dir: Path) -> Path:
    """Write RUN/config.yaml atomically; a different config from an earlier launch is kept aside."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RESOLVED_NAME
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if target.exists() and target.read_text() != text:
        target.rename(run_dir / f"config.{time.strftime('%Y%m%dT%H%M%S')}.yaml")
    atomic_write(target, text)
    return target
