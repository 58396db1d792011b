"""Caduceus backbone and CaduceusForMaskedLM (Ph: rcps=False, PS: rcps=True).

Module names reproduce the Hugging Face state dict of the published checkpoints
(docs/reference-model.md §2). Nothing here knows about parallelism: `blocks()` hands engines the
repeated units to wrap, compile and checkpoint. This file and the modules it imports relatively ship
inside every Hugging Face export (docs/inference.md §1), so they import nothing else of caduceus_dist.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import CaduceusConfig
from .mamba import BiMambaWrapper, Mamba
from .rcps import (
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
        self.gradient_checkpointing = config.gradient_checkpointing  # transformers' gradient_checkpointing_enable sets it
        self.embeddings = CaduceusEmbeddings(config)
        self.layers = nn.ModuleList(CaduceusBlock(config) for _ in range(config.n_layer))
        norm_f = Norm(config.d_model, config.norm_epsilon, rms=config.rms_norm)
        self.norm_f = RCPSAddNormWrapper(norm_f) if config.rcps and not config.fused_add_norm else norm_f

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.embeddings(input_ids)
        residual = None
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
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
        self.apply(lambda module: init_weights(module, config))
        head = self.lm_head.lm_head if config.rcps else self.lm_head
        head.weight = self.caduceus.backbone.embeddings.word_embeddings.weight  # tied (docs/reference-model.md §2)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.caduceus(input_ids)).float()

    def blocks(self) -> list[nn.Module]:
        """The repeated units, in order: what engines wrap (FSDP2), compile and checkpoint one by one."""
        return list(self.caduceus.backbone.layers)

    # Hugging Face layout -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors exactly as the published checkpoints (tied tensors stored once)."""
        from . import hf_io  # not at the top: a Hugging Face export ships this file without hf_io

        return hf_io.save_pretrained(self, self.config, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> CaduceusForMaskedLM:
        """Load a directory written by save_pretrained or downloaded from the hub; overrides set runtime fields."""
        from . import hf_io

        config = hf_io.read_config(path, **overrides)
        model = cls(config)
        hf_io.load_weights(model, path)
        return model



def init_weights(module: nn.Module, config: CaduceusConfig) -> None:
    """docs/reference-model.md §7: zero Linear biases (except dt_proj), N(0, 0.02) embeddings, out_proj / sqrt(n_layer)."""
    init = config.initializer
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=init["initializer_range"])
    if isinstance(module, Mamba) and init["rescale_prenorm_residual"]:
        weight = module.out_proj.weight
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        with torch.no_grad():
            weight /= math.sqrt(init["n_residuals_per_layer"] * config.n_layer)


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of every parameter reachable under two names (the head and the embedding,
    mamba_rev's in/out_proj and mamba_fwd's). A checkpoint stores each such tensor once, under its first name."""
    first_names: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_names.setdefault(id(param), name)
        if first != name:
            tied[name] = first
    return tied


def conjoined_hidden(backbone: nn.Module, input_ids: Tensor, config: CaduceusConfig) -> Tensor:
    """Strand-symmetric hidden states (B, L, D), position-aligned: out(RC x)[i] = out(x)[L-1-i].

    PS averages the forward half with the channel-reversed RC half of each position (exact by construction);
    Ph averages a forward pass with the position-flipped pass over the reverse complement (the paper's
    post-hoc conjoining; two passes). docs/inference.md §2."""
    hidden = backbone(input_ids)
    if config.rcps:
        first, second = hidden.chunk(2, dim=-1)
        return (first + second.flip(-1)) / 2
    complement = torch.tensor(config.padded_complement_map(), device=input_ids.device)
    return (hidden + backbone(complement[input_ids].flip(-1)).flip(-2)) / 2
