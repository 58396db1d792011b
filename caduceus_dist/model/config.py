"""CaduceusConfig: the reference field names and defaults (docs/reference-model.md §1) plus our runtime switches.

It is a plain dataclass so that `OmegaConf.structured(CaduceusConfig)` types and validates recipe
overrides. `to_hf_dict` / `from_hf_dict` read and write the `config.json` of the published
Hugging Face checkpoints (model_type "caduceus"); runtime switches (backend, checkpointing, chunk
size) are not part of that file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .tokenizer import COMPLEMENT_MAP

MODEL_TYPE = "caduceus"

# Mamba(d_model, **ssm_cfg) keyword defaults of mamba_ssm v1.2.0.post1 (docs/reference-model.md §1, §3).
SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init": "random",
    "dt_scale": 1.0,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "bias": False,
    "use_fast_path": True,  # accepted for config compatibility; the kernel backend decides
}
INITIALIZER_DEFAULTS: dict[str, Any] = {
    "initializer_range": 0.02,
    "rescale_prenorm_residual": True,
    "n_residuals_per_layer": 1,
}
BIDIRECTIONAL_STRATEGIES = ("add", "ew_multiply")

# Keys that transformers' PretrainedConfig writes into every config.json; they carry no model meaning here.
_HF_GENERIC_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "tie_word_embeddings",
    "_name_or_path", "_commit_hash", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "pad_token_id", "bos_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "dtype",
    "pooling", "conjoin_eval",  # options of the Hub classifier (configuration_caduceus.py)
})
_RUNTIME_FIELDS = ("backend", "gradient_checkpointing", "scan_chunk_size")


@dataclass
class CaduceusConfig:
    """Reference CaduceusConfig fields (same names, same class defaults) plus runtime switches."""

    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict[str, Any] = field(default_factory=dict)  # reference default None == Mamba defaults
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    norm_epsilon: float = 1e-5
    initializer_cfg: dict[str, Any] = field(default_factory=dict)
    bidirectional: bool = True
    bidirectional_strategy: str = "add"
    bidirectional_weight_tie: bool = True
    rcps: bool = False
    complement_map: dict[int, int] | None = None  # None: the tokenizer's map (docs/reference-model.md §8)
    # Runtime switches (ours; not written to config.json).
    backend: str = "auto"  # auto | torch | native | cuda (kernels.KERNEL_BACKENDS; CADUCEUS_NATIVE=0 disables native)
    gradient_checkpointing: bool = False  # per-layer activation checkpointing
    scan_chunk_size: int = 0  # positions per chunk of the torch / native scans (memory ~ B*E*N*chunk); 0 = auto

    def __post_init__(self) -> None:
        unknown = set(self.ssm_cfg) - set(SSM_DEFAULTS)
        if unknown:
            raise ValueError(f"ssm_cfg has unknown key(s) {sorted(unknown)}; known: {sorted(SSM_DEFAULTS)}")
        unknown = set(self.initializer_cfg) - set(INITIALIZER_DEFAULTS)
        if unknown:
            raise ValueError(
                f"initializer_cfg has unknown key(s) {sorted(unknown)}; known: {sorted(INITIALIZER_DEFAULTS)}"
            )
        if self.bidirectional_strategy not in BIDIRECTIONAL_STRATEGIES:
            raise ValueError(
                f"bidirectional_strategy={self.bidirectional_strategy!r} is not implemented; "
                f"use one of {BIDIRECTIONAL_STRATEGIES}"
            )

    # Derived values -------------------------------------------------------------------------------
    @property
    def ssm(self) -> dict[str, Any]:
        return SSM_DEFAULTS | dict(self.ssm_cfg)

    @property
    def initializer(self) -> dict[str, Any]:
        return INITIALIZER_DEFAULTS | dict(self.initializer_cfg)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / multiple) * multiple

    @property
    def d_inner(self) -> int:
        return int(self.ssm["expand"] * self.d_model)

    @property
    def dt_rank(self) -> int:
        rank = self.ssm["dt_rank"]
        return math.ceil(self.d_model / 16) if rank == "auto" else int(rank)

    def padded_complement_map(self) -> list[int]:
        """Complement of every padded vocab id; ids without an entry map to themselves (docs/reference-model.md §1)."""
        base = COMPLEMENT_MAP if self.complement_map is None else {int(k): int(v) for k, v in self.complement_map.items()}
        return [base.get(i, i) for i in range(self.padded_vocab_size)]

    # config.json ----------------------------------------------------------------------------------
    @classmethod
    def file_field_defaults(cls) -> dict[str, Any]:
        """The fields config.json holds, with their class defaults (the runtime switches left out)."""
        defaults = cls()
        return {f.name: getattr(defaults, f.name) for f in fields(cls) if f.name not in _RUNTIME_FIELDS}

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content as the reference writes it (vocab and complement map already padded)."""
        out = {k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS}
        out["ssm_cfg"] = dict(self.ssm_cfg) or None
        out["initializer_cfg"] = dict(self.initializer_cfg) or None
        out["vocab_size"] = self.padded_vocab_size
        out["complement_map"] = {str(i): c for i, c in enumerate(self.padded_complement_map())}
        return {"architectures": ["CaduceusForMaskedLM"], "model_type": MODEL_TYPE, **out, "torch_dtype": "float32"}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json", **overrides: Any) -> CaduceusConfig:
        """Inverse of to_hf_dict; also reads the hub files. Unknown keys fail, naming them and the file."""
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        names = {f.name for f in fields(cls)} - set(_RUNTIME_FIELDS)
        unknown = set(data) - names - _HF_GENERIC_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown CaduceusConfig key(s) {sorted(unknown)}; known: {sorted(names)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("ssm_cfg", "initializer_cfg"):
            kwargs[key] = dict(kwargs.get(key) or {})
        if kwargs.get("complement_map") is not None:
            kwargs["complement_map"] = {int(k): int(v) for k, v in kwargs["complement_map"].items()}
        return cls(**(kwargs | overrides))
