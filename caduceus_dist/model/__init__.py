"""The Caduceus model (Ph and PS), its tokenizer, loss, optimizer groups and FLOP counter.

Names resolve lazily (PEP 562) so that `caduceus_dist.model.tokenizer` users (the sharder) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CaduceusConfig": "caduceus_dist.model.config",
    "CaduceusForMaskedLM": "caduceus_dist.model.caduceus",
    "CaduceusTokenizer": "caduceus_dist.model.tokenizer",
    "flops_per_token": "caduceus_dist.model.flops",
    "mlm_loss": "caduceus_dist.model.caduceus",
    "param_groups": "caduceus_dist.model.optim_groups",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'caduceus_dist.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
