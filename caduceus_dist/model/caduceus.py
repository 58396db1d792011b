"""Caduceus backbone and CaduceusForMaskedLM (Ph: rcps=False, PS: rcps=True).

Module names reproduce the Hugging Face state dict of the published checkpoints
(docs/reference-model.md §2). Nothing here knows about parallelism: `blocks()` hands engines the
repeated units to wrap, compile and checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from caduceus_dist.model import hf_io
from caduceus_dist.model.config import CaduceusConfig
from caduceus_dist.model.mamba import BiMambaWrapper, Mamba
from caduceus_dist.model.rcps import (
    Norm,
    RCPSAddNormWrapper,
    RCPSEmbedding,
    RCPSLMHead,
    RCPSWrapper,
    add_residual,
)


class CaduceusBlock(nn.Module):
    """residual += hidden; hidden = mixer(norm(residual)). PS+fused swaps the channel halves (docs/reference-model.md §6)."""

    def __init__(self, config: CaduceusConfig) -> None:
        super().__init__()
        self.rcps = config.rcps
        self.swap_halves = config.rcps and config.fused_add_norm
        self.residual_in_fp32 = config.residual_in_fp32
        mixer = BiMambaWrapper(
            config.d_model,
            bidirectional=config.bidirectional,
            bidirectional_strategy=config.bidirectional_strategy,
            bidirectional_weight_tie=config.bidirectional_weight_tie,
            backend=config.backend,
            scan_chunk_size=config.scan_chunk_size,
            **config.ssm,
        )
        self.mixer = RCPSWrapper(mixer) if config.rcps else mixer
        norm = Norm(config.d_model, config.norm_epsilon, rms=config.rms_norm)
        self.norm = RCPSAddNormWrapper(norm) if config.rcps and not config.fused_add_norm else norm

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = add_residual(hidden, residual, self.residual_in_fp32)
        if self.swap_halves:  # the fused RCPS kernel call feeds h2 into the forward slot
            first, second = residual.chunk(2, dim=-1)
            residual = torch.cat([second, first], dim=-1)
        normed = self.norm(residual, hidden.dtype, rc_halves=self.rcps)
        return self.mixer(normed), residual


class CaduceusEmbeddings(nn.Module):
    def __init__(self, config: CaduceusConfig) -> None:
        super().__init__()
        vocab = config.padded_vocab_size
        if config.rcps:
            self.word_embeddings = RCPSEmbedding(vocab, config.d_model, config.padded_complement_map())
        else:
            self.word_embeddings = nn.Embedding(vocab, config.d_model)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


class CaduceusMixerModel(nn.Module):
    def __init__(self, config: CaduceusConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CaduceusEmbeddings(config)
        self.layers = nn.ModuleList(CaduceusBlock(config) for _ in range(config.n_layer))
        norm_f = Norm(config.d_model, config.norm_epsilon, rms=config.rms_norm)
        self.norm_f = RCPSAddNormWrapper(norm_f) if config.rcps and not config.fused_add_norm else norm_f

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.embeddings(input_ids)
        residual = None
        for layer in self.layers:
            if self.config.gradient_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
        total = add_residual(hidden, residual, self.config.residual_in_fp32)  # final norm: never swapped
        return self.norm_f(total, hidden.dtype, rc_halves=self.config.rcps)


class Caduceus(nn.Module):
    def __init__(self, config: CaduceusConfig) -> None:
        super().__init__()
        self.backbone = CaduceusMixerModel(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.backbone(input_ids)


class CaduceusForMaskedLM(nn.Module):
    """Caduceus with the tied MLM head; forward(input_ids (B, L)) -> fp32 logits (B, L, padded vocab)."""

    def __init__(self, config: CaduceusConfig) -> None:
        super().__init__()
        self.config = config
        self.caduceus = Caduceus(config)
        vocab = config.padded_vocab_size
        if config.rcps:
            self.lm_head = RCPSLMHead(config.d_model, vocab, config.padded_complement_map())
        else:
            self.lm_head = nn.Linear(config.d_model, vocab, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        embedding = self.caduceus.backbone.embeddings.word_embeddings
        head = self.lm_head.lm_head if self.config.rcps else self.lm_head
        head.weight = embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        """docs/reference-model.md §7: zero Linear biases (except dt_proj), N(0, 0.02) embeddings, out_proj / sqrt(n_layer)."""
        init = self.config.initializer
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=init["initializer_range"])
        if isinstance(module, Mamba) and init["rescale_prenorm_residual"]:
            weight = module.out_proj.weight
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            with torch.no_grad():
                weight /= math.sqrt(init["n_residuals_per_layer"] * self.config.n_layer)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.caduceus(input_ids)).float()

    def blocks(self) -> list[nn.Module]:
        """The repeated units, in order: what engines wrap (FSDP2), compile and checkpoint one by one."""
        return list(self.caduceus.backbone.layers)

    # Hugging Face layout -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors exactly as the published checkpoints (tied tensors stored once)."""
        return hf_io.save_pretrained(self, self.config, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> CaduceusForMaskedLM:
        """Load a directory written by save_pretrained or downloaded from the hub; overrides set runtime fields."""
        config = hf_io.read_config(path, **overrides)
        model = cls(config)
        hf_io.load_weights(model, path)
        return model

