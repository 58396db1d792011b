"""The transformers configuration class of a Hugging Face export (docs/inference.md §1).

It holds the fields of `config.json` (docs/reference-model.md §1) under their reference names and
defaults, taken from our `CaduceusConfig`, so that one definition serves training and the Hub. The
classifier options (`pooling`, `conjoin_eval`) are ours. This file ships inside every export, next to
modeling_caduceus.py and the model files, and imports only them and transformers.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .config import CaduceusConfig as ModelConfig
from .tokenizer import PAD_ID  # imported here too: transformers 4.x copies only this file's relative imports

POOLINGS = ("mean", "first", "last")


class CaduceusConfig(PretrainedConfig):
    model_type = "caduceus"
    _auto_class = "AutoConfig"  # save_pretrained writes this file along (transformers 4.x only did so when set)

    def __init__(self, pooling: str = "mean", conjoin_eval: bool = True, **kwargs):
        for name, default in ModelConfig.file_field_defaults().items():
            setattr(self, name, kwargs.pop(name, default))
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        self.pooling = pooling
        self.conjoin_eval = conjoin_eval  # Ph classifier: average with the reverse-complement pass when not training
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("pad_token_id", PAD_ID)
        super().__init__(**kwargs)

    def model_config(self, **runtime) -> ModelConfig:
        """Our dataclass for the model modules; `runtime` sets backend, scan_chunk_size, gradient_checkpointing."""
        fields = {name: getattr(self, name) for name in ModelConfig.file_field_defaults()}
        return ModelConfig.from_hf_dict(fields, source="config.json", **runtime)
