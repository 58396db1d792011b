"""Test-only independent re-derivation of the Caduceus forward pass from the written formulas.

Written directly from docs/reference-model.md §2-§6 and §9 with none of the
package's code: it works on a plain dict of tensors under the Hugging Face names, keeps the
reference's channel-first Mamba layout, uses nn.functional.conv1d for the causal conv and a
sequential per-position loop for the selective scan (selective_scan_ref semantics), and reads and
writes checkpoints in the published layout (config.json + model.safetensors, tied tensors once).
Slow on purpose; only for small test models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

VOCAB = 16
HUB_COMPLEMENT = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 10, 8: 9, 9: 8, 10: 7, 11: 11,
                  12: 12, 13: 13, 14: 14, 15: 15}


def hub_config(d_model: int, n_layer: int, rcps: bool, fused_add_norm: bool = True) -> dict:
    """A config.json like the hub's (docs/reference-model.md §1 right column)."""
    return {
        "_name_or_path": "reference", "architectures": ["CaduceusForMaskedLM"], "model_type": "caduceus",
        "d_model": d_model, "n_layer": n_layer, "vocab_size": VOCAB,
        "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
                    "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True,
                    "bias": False, "use_fast_path": True},
        "rms_norm": True, "residual_in_fp32": False, "fused_add_norm": fused_add_norm,
        "pad_vocab_size_multiple": 8, "norm_epsilon": 1e-5,
        "initializer_cfg": {"initializer_range": 0.02, "rescale_prenorm_residual": True, "n_residuals_per_layer": 1},
        "bidirectional": True, "bidirectional_strategy": "add", "bidirectional_weight_tie": True,
        "rcps": rcps, "complement_map": {str(k): v for k, v in HUB_COMPLEMENT.items()},
        "torch_dtype": "float32", "transformers_version": "4.38.1",
    }


def _mixer_prefix(cfg: dict, i: int) -> str:
    return f"caduceus.backbone.layers.{i}.mixer." + ("submodule." if cfg["rcps"] else "")


def _norm_name(cfg: dict, stem: str) -> str:
    return stem + ("submodule.weight" if cfg["rcps"] and not cfg["fused_add_norm"] else "weight")


def _embedding_name(cfg: dict) -> str:
    return "caduceus.backbone.embeddings.word_embeddings." + ("embedding.weight" if cfg["rcps"] else "weight")


def random_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the names of model.safetensors (tied duplicates absent), plausible scales."""
    gen = torch.Generator().manual_seed(seed)
    D, N = cfg["d_model"], 16
    E, R = 2 * D, math.ceil(D / 16)

    def rnd(*shape, scale):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    sd = {_embedding_name(cfg): torch.randn(VOCAB, D, generator=gen) * 0.5}
    comp = torch.tensor([HUB_COMPLEMENT[i] for i in range(VOCAB)], dtype=torch.long)
    if cfg["rcps"]:
        sd["caduceus.backbone.embeddings.word_embeddings.complement_map"] = comp
        sd["lm_head.complement_map"] = comp.clone()
    for i in range(cfg["n_layer"]):
        for direction in ("mamba_fwd", "mamba_rev"):
            p = _mixer_prefix(cfg, i) + direction + "."
            sd[p + "A_log"] = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1) + rnd(E, N, scale=0.5)
            sd[p + "D"] = 1 + rnd(E, scale=0.5)
            if direction == "mamba_fwd":  # in/out_proj of mamba_rev are tied to these and not stored
                sd[p + "in_proj.weight"] = rnd(2 * E, D, scale=1 / math.sqrt(D))
            sd[p + "conv1d.weight"] = rnd(E, 1, 4, scale=0.5)
            sd[p + "conv1d.bias"] = rnd(E, scale=0.5)
            sd[p + "x_proj.weight"] = rnd(R + 2 * N, E, scale=1 / math.sqrt(E))
            sd[p + "dt_proj.weight"] = rnd(E, R, scale=1 / math.sqrt(R))
            sd[p + "dt_proj.bias"] = rnd(E, scale=2.0) - 4.0
            if direction == "mamba_fwd":
                sd[p + "out_proj.weight"] = rnd(D, E, scale=1 / math.sqrt(E))
        sd[_norm_name(cfg, f"caduceus.backbone.layers.{i}.norm.")] = 1 + rnd(D, scale=0.5)
    sd[_norm_name(cfg, "caduceus.backbone.norm_f.")] = 1 + rnd(D, scale=0.5)
    return sd


def save_reference(directory: Path, cfg: dict, sd: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_reference(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((directory / "config.json").read_text()), load_file(str(directory / "model.safetensors"))


def _linear(x, w):
    return x @ w.t()


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias):
    """docs/reference-model.md §4 literally: channel-first u (b, e, l), B/C (b, n, l), one position at a time."""
    delta = F.softplus(delta + delta_bias[:, None])
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2) + D[:, None] * u
    return y * F.silu(z)


def _mamba(sd, prefix, fwd_prefix, h):
    """Mamba v1 on h (b, l, d) in the reference's channel-first layout (docs/reference-model.md §3)."""
    def get(name):  # tied in/out_proj of mamba_rev live under mamba_fwd's names
        return sd[prefix + name] if prefix + name in sd else sd[fwd_prefix + name]

    E = get("D").shape[0]
    N = get("A_log").shape[1]
    R = get("dt_proj.weight").shape[1]
    L = h.shape[1]
    xz = torch.einsum("od,bld->bol", get("in_proj.weight"), h)
    x, z = xz[:, :E], xz[:, E:]
    x = F.silu(F.conv1d(x, get("conv1d.weight"), get("conv1d.bias"), padding=3, groups=E)[..., :L])
    x_dbl = _linear(x.transpose(1, 2), get("x_proj.weight"))
    dt, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    delta = torch.einsum("er,blr->bel", get("dt_proj.weight"), dt)
    y = _selective_scan_sequential(x, delta, -torch.exp(get("A_log")), B.transpose(1, 2), C.transpose(1, 2),
                                   get("D"), z, get("dt_proj.bias"))
    return _linear(y.transpose(1, 2), get("out_proj.weight"))


def _bimamba(sd, prefix, h):
    fwd = _mamba(sd, prefix + "mamba_fwd.", prefix + "mamba_fwd.", h)
    rev = _mamba(sd, prefix + "mamba_rev.", prefix + "mamba_fwd.", h.flip(1)).flip(1)
    return fwd + rev


def reference_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits (b, l, 16) of CaduceusForMaskedLM for Ph (rcps false) or PS (rcps true)."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    W = sd[_embedding_name(cfg)]
    D = W.shape[1]
    comp = torch.tensor([int(cfg["complement_map"][str(i)]) for i in range(VOCAB)])
    rcps, fused = cfg["rcps"], cfg["fused_add_norm"]
    h = torch.cat([W[ids], W[comp[ids]].flip(-1)], dim=-1) if rcps else W[ids]
    residual = None
    for i in range(cfg["n_layer"]):
        w = sd[_norm_name(cfg, f"caduceus.backbone.layers.{i}.norm.")]
        prefix = _mixer_prefix(cfg, i)
        if not rcps:
            residual = h if residual is None else residual + h
            h = _bimamba(sd, prefix, _rms(residual, w))
            continue
        h1, h2 = h[..., :D], h[..., D:]
        r1, r2 = (0, 0) if residual is None else (residual[..., :D], residual[..., D:])
        a, b = (h2 + r2, h1 + r1) if fused else (h1 + r1, h2 + r2)  # the fused path swaps the halves
        residual = torch.cat([a, b], dim=-1)
        n1, n2 = _rms(a, w), _rms(b, w.flip(0))
        out1 = _bimamba(sd, prefix, n1)
        out2 = _bimamba(sd, prefix, n2.flip(1, 2)).flip(1, 2)
        h = torch.cat([out1, out2], dim=-1)
    total = h + residual
    wf = sd[_norm_name(cfg, "caduceus.backbone.norm_f.")]
    if not rcps:
        return (_rms(total, wf) @ W.t()).float()
    s1, s2 = _rms(total[..., :D], wf), _rms(total[..., D:], wf.flip(0))
    return (s1 @ W.t() + s2.flip(-1) @ W[comp].t()).float()
