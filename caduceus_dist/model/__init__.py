"""The Caduceus model (Ph and PS), its tokenizer, loss, optimizer groups and FLOP counter."""

from caduceus_dist.model.caduceus import CaduceusForMaskedLM, mlm_loss
from caduceus_dist.model.config import CaduceusConfig
from caduceus_dist.model.flops import flops_per_token
from caduceus_dist.model.optim_groups import param_groups
from caduceus_dist.model.tokenizer import CaduceusTokenizer

__all__ = [
    "CaduceusConfig",
    "CaduceusForMaskedLM",
    "CaduceusTokenizer",
    "flops_per_token",
    "mlm_loss",
    "param_groups",
]
