"""The Caduceus model (Ph and PS), its tokenizer, optimizer groups and FLOP counter.

Names resolve lazily (PEP 562) so that `caduceus_dist.model.tokenizer` users (the sharder) do not
pay for importing torch.
"""

from __future__ import annotations

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "CaduceusConfig": "config",
    "CaduceusForMaskedLM": "caduceus",
    "CaduceusTokenizer": "tokenizer",
    "flops_per_token": "flops",
    "param_groups": "optim_groups",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
