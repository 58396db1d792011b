"""Read and write the Hugging Face layout of the published Caduceus checkpoints.

A directory holds `config.json` (CaduceusConfig.to_hf_dict) and `model.safetensors` with the names of
docs/reference-model.md §2; tensors that share storage (lm_head = embedding, mamba_rev in/out_proj = mamba_fwd's) are
stored once under their first name, with metadata {"format": "pt"}, as transformers writes them.
Loading also accepts Lightning training checkpoints (`.ckpt`, names prefixed "model.") and re-ties by
construction. Any mismatch between the weights and the model built from config.json fails with the
list of missing, unexpected and mis-shaped keys instead of loading half a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from caduceus_dist.fsio import atomic_path, atomic_write
from caduceus_dist.model.caduceus import tied_parameter_names
from caduceus_dist.model.config import CaduceusConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LIGHTNING_PREFIX = "model."
# The transformers remote code of an export: the Hub classes and the model files they import relatively.
HUB_CODE_FILES = ("configuration_caduceus.py", "modeling_caduceus.py", "tokenization_caduceus.py", "caduceus.py",
                  "config.py", "mamba.py", "kernels.py", "scan.py", "rcps.py", "tokenizer.py")
TOKENIZER_CONFIG = {
    "tokenizer_class": "CaduceusTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_caduceus.CaduceusTokenizer", None]},
    "model_max_length": 131072,
    "padding_side": "left",
}
AUTO_MAP = {
    "AutoConfig": "configuration_caduceus.CaduceusConfig",
    "AutoModel": "modeling_caduceus.Caduceus",
    "AutoModelForMaskedLM": "modeling_caduceus.CaduceusForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_caduceus.CaduceusForSequenceClassification",
}


def read_config(path: str | Path, **overrides) -> CaduceusConfig:
    """CaduceusConfig from a checkpoint directory (or a config.json path); overrides set runtime fields."""
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json; expected a directory written by save_pretrained")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    return CaduceusConfig.from_hf_dict(data, source=str(config_path), **overrides)


def _unique_tensors(model: nn.Module) -> dict[str, Tensor]:
    """state_dict without the second name of a tied tensor (first name wins, as in transformers)."""
    tied = tied_parameter_names(model)
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items() if name not in tied}


def save_pretrained(model: nn.Module, config: CaduceusConfig, directory: str | Path) -> Path:
    """Write config.json and model.safetensors (each atomically: a reader never sees a torn file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as weights_tmp:
        save_file(_unique_tensors(model), str(weights_tmp), metadata={"format": "pt"})
    atomic_write(directory / CONFIG_NAME, json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    return directory


def write_hub_code(directory: str | Path) -> None:
    """Make a save_pretrained directory loadable by transformers' Auto classes (trust_remote_code=True):
    copy the model files in and point config.json's auto_map at them (docs/inference.md §1)."""
    directory = Path(directory)
    source = Path(__file__).parent
    for name in HUB_CODE_FILES:
        atomic_write(directory / name, (source / name).read_text())
    config = json.loads((directory / CONFIG_NAME).read_text())
    atomic_write(directory / CONFIG_NAME, json.dumps(config | {"auto_map": AUTO_MAP}, indent=2, sort_keys=True) + "\n")
    atomic_write(directory / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint directory, a .safetensors file or a Lightning .ckpt / torch .bin file."""
    path = weights_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file; expected {WEIGHTS_NAME} written by save_pretrained")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload.get("state_dict", payload) if isinstance(payload, dict) else payload


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
    """Load HF names (optionally Lightning-prefixed "model."), filling tied names; strict on names and shapes."""
    if state_dict and all(name.startswith(LIGHTNING_PREFIX) for name in state_dict):
        state_dict = {name[len(LIGHTNING_PREFIX):]: t for name, t in state_dict.items()}
    state_dict = dict(state_dict)
    for second, first in tied_parameter_names(model).items():
        if first in state_dict or second in state_dict:
            state_dict.setdefault(second, state_dict.get(first))
            state_dict.setdefault(first, state_dict[second])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(t.shape)}"
        for name, t in expected.items() if name in state_dict and state_dict[name].shape != t.shape
    )
    if missing or unexpected or mis_shaped:
        problems = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
            if items:
                problems.append(f"{label} ({len(items)}): " + "; ".join(items))
        raise ValueError(
            f"{source}: the weights do not match the model built from its config "
            "(wrong config.json, d_model/n_layer/rcps/fused_add_norm/bidirectional?). " + " | ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def load_weights(model: nn.Module, path: str | Path) -> None:
    load_hf_state_dict(model, read_state_dict(path), source=str(weights_path(path)))
