"""Typed configuration of the data pipeline (the `data:` section of a job recipe).

OmegaConf structured dataclasses: an unknown key or a wrong type fails when the recipe is merged;
`validate()` checks what types cannot (ranges, names, combinations) and raises ValueError naming
the key. Checks that need the shards (window length) or the topology (world size, gradient
accumulation) happen when `TrainStream` is built, before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caduceus_dist.fsio import VERIFY_MODES  # what is checked for every shard of a split at start-up

ON_CORRUPT_MODES = ("error", "skip")
HOLD_MODES = ("tokens", "batch")  # what a curriculum keeps constant across stages
START_METHODS = ("fork", "forkserver", "spawn")  # how DataLoader workers start (Python 3.14's default: forkserver)


@dataclass
class StageConfig:
    """One curriculum stage: its length, and how long it lasts (`steps` or `tokens`; neither = open end)."""

    seq_len: int = 1024
    steps: int | None = None
    tokens: int | None = None


@dataclass
class CurriculumConfig:
    """Sequence-length schedule. Off (empty `stages`, no `start_seq_len`) = fixed `data.seq_len`.

    Either list `stages` explicitly, or generate them HyenaDNA-style: `start_seq_len`, multiplied by
    `growth` every `stage_steps` steps until `data.seq_len` (the final, open-ended stage).
    `hold: tokens` keeps `data.tokens_per_step` constant (the batch shrinks as sequences grow);
    `hold: batch` keeps `global_batch` sequences per step (HyenaDNA's mode; tokens per step grow).
    """

    stages: list[StageConfig] = field(default_factory=list)
    start_seq_len: int | None = None
    growth: int = 2
    stage_steps: int | None = None
    hold: str = "tokens"
    global_batch: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.stages) or self.start_seq_len is not None

    def validate(self) -> None:
        if self.hold not in HOLD_MODES:
            raise ValueError(f"curriculum.hold: '{self.hold}' is not one of {list(HOLD_MODES)}")
        if self.stages and self.start_seq_len is not None:
            raise ValueError("curriculum: set either curriculum.stages or curriculum.start_seq_len, not both")
        if self.start_seq_len is not None:
            if self.start_seq_len <= 0:
                raise ValueError(f"curriculum.start_seq_len must be > 0, got {self.start_seq_len}")
            if self.growth < 2:
                raise ValueError(f"curriculum.growth must be >= 2, got {self.growth}")
            if not self.stage_steps or self.stage_steps <= 0:
                raise ValueError(f"curriculum.stage_steps must be > 0 with curriculum.start_seq_len, got {self.stage_steps}")
        for i, stage in enumerate(self.stages):
            if stage.seq_len <= 0:
                raise ValueError(f"curriculum.stages[{i}].seq_len must be > 0, got {stage.seq_len}")
            if stage.steps is not None and stage.tokens is not None:
                raise ValueError(f"curriculum.stages[{i}]: set steps or tokens, not both")
            duration = stage.steps if stage.steps is not None else stage.tokens
            if duration is None and i != len(self.stages) - 1:
                raise ValueError(f"curriculum.stages[{i}] needs steps or tokens (only the last stage is open-ended)")
            if duration is not None and duration <= 0:
                raise ValueError(f"curriculum.stages[{i}] duration must be > 0, got {duration}")
        if self.hold == "batch" and self.enabled and not self.global_batch:
            raise ValueError("curriculum.hold=batch needs curriculum.global_batch (sequences per optimizer step)")


@dataclass
class SourceConfig:
    """One genome of a mixture: a shard root (data_prep/shard_genome.py --out) and its sampling weight."""

    name: str = ""
    shards: str = ""
    weight: float = 1.0


@dataclass
class MixturePhase:
    """From `start_step` (or `start_tokens`, the first step at or past that many tokens) on, rows are
    drawn from the sources in proportion to `weights` (source name -> weight; a source left out: 0)."""

    start_step: int | None = None
    start_tokens: int | None = None
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the shards are and how they become batches (see `caduceus_dist.data` for the semantics)."""

    shards: str = "data/shards/sample"  # dataset root holding manifest.json (data_prep/shard_genome.py --out)
    sources: list[SourceConfig] = field(default_factory=list)  # a mixture of shard roots; replaces `shards`
    mixture_schedule: list[MixturePhase] = field(default_factory=list)  # weights by phase; none: sources' weights
    split: str = "train"
    seq_len: int = 1024  # the fixed length, or the final stage of a generated curriculum
    tokens_per_step: int = 1 << 20  # global tokens per optimizer step (reference: 2^20)
    seed: int | None = None  # None: use train.seed
    mlm_probability: float = 0.15  # docs/reference-recipe.md §4
    mask_fraction: float = 0.8  # of the selected positions -> [MASK]
    random_fraction: float = 0.1  # of the selected positions -> uniform id in [0, 12); the rest stay
    rc_probability: float = 0.0  # reverse-complement augmentation (0.5 for Caduceus-Ph, 0 for PS)
    num_workers: int = 2
    worker_start_method: str = "fork"  # fork | forkserver | spawn
    prefetch_factor: int = 2
    pin_memory: bool = True  # only takes effect where CUDA is available
    on_corrupt: str = "error"  # error | skip (drop a bad shard with a warning, counted)
    verify: str = "sha256"  # start-up check of every shard: sha256 (content) | size (size + index only)
    verify_cache: bool = True  # sha256: skip shards verified before whose size and mtime are unchanged
    eval_seq_len: int | None = None  # None: seq_len
    eval_batch_size: int | None = None  # global sequences per eval batch; None: tokens_per_step / eval_seq_len
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def validate(self) -> None:
        positive = {"seq_len": self.seq_len, "tokens_per_step": self.tokens_per_step,
                    "prefetch_factor": self.prefetch_factor}
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"data.{key} must be > 0, got {value}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.worker_start_method not in START_METHODS:
            raise ValueError(f"data.worker_start_method: '{self.worker_start_method}' is not one of {list(START_METHODS)}")
        for key in ("mlm_probability", "mask_fraction", "random_fraction", "rc_probability"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {value}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(f"data.mask_fraction + data.random_fraction must be <= 1, got "
                             f"{self.mask_fraction} + {self.random_fraction}")
        if self.on_corrupt not in ON_CORRUPT_MODES:
            raise ValueError(f"data.on_corrupt: '{self.on_corrupt}' is not one of {list(ON_CORRUPT_MODES)}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"data.verify: '{self.verify}' is not one of {list(VERIFY_MODES)}")
        for key in ("eval_seq_len", "eval_batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"data.{key} must be > 0, got {value}")
        try:
            self.curriculum.validate()
        except ValueError as err:
            raise ValueError(f"data.{err}") from None
        self._validate_mixture()

    def _validate_mixture(self) -> None:
        names = [source.name for source in self.sources]
        for i, source in enumerate(self.sources):
            if not source.name or not source.shards:
                raise ValueError(f"data.sources[{i}] needs a name and shards (a shard root), got "
                                 f"name={source.name!r} shards={source.shards!r}")
            if "/" in source.name or source.name in names[:i]:
                raise ValueError(f"data.sources[{i}].name {source.name!r} must be unique and contain no '/'")
            if source.weight < 0:
                raise ValueError(f"data.sources[{i}].weight must be >= 0, got {source.weight}")
        if self.mixture_schedule and not self.sources:
            raise ValueError("data.mixture_schedule needs data.sources (it weighs named sources)")
        starts = []
        for i, phase in enumerate(self.mixture_schedule):
            if (phase.start_step is None) == (phase.start_tokens is None):
                raise ValueError(f"data.mixture_schedule[{i}]: set exactly one of start_step and start_tokens")
            start = phase.start_step if phase.start_step is not None else phase.start_tokens
            if start < 0 or (i == 0 and start != 0):
                raise ValueError(f"data.mixture_schedule[{i}] starts at {start}; the first phase starts at 0")
            starts.append(start)
            unknown = sorted(set(phase.weights) - set(names))
            if unknown:
                raise ValueError(f"data.mixture_schedule[{i}].weights names {unknown}, which are not in data.sources "
                                 f"({names})")
            if any(w < 0 for w in phase.weights.values()) or not any(w > 0 for w in phase.weights.values()):
                raise ValueError(f"data.mixture_schedule[{i}].weights must be >= 0 with one > 0, got {phase.weights}")
        if self.sources and not self.mixture_schedule and not any(s.weight > 0 for s in self.sources):
            raise ValueError("data.sources: every weight is 0, so no source would ever be read")
