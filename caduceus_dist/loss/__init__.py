"""The training objective, apart from any engine.

    config.py  LossConfig (the `loss:` keys; no torch)
    mlm.py     MaskedLMLoss (the reference cross-entropy, optionally down-weighting soft-masked targets),
               mlm_loss, EVAL_SUMS
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "LossConfig": "config",
    "EVAL_SUMS": "mlm",
    "IGNORE_INDEX": "mlm",
    "LossSums": "mlm",
    "MaskedLMLoss": "mlm",
    "count_targets": "mlm",
    "mlm_loss": "mlm",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
