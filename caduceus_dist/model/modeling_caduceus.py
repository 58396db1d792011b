"""The transformers classes of a Hugging Face export: AutoModel, AutoModelForMaskedLM and
AutoModelForSequenceClassification with `trust_remote_code=True` (docs/inference.md §1).

They wrap our model modules (caduceus.py and what it imports), which ship next to this file, so the
export runs wherever PyTorch and transformers (4.46 and later, 5.x included) do: pure PyTorch on any
device, the C kernels never (they stay in caduceus_dist), mamba-ssm's kernels on CUDA when importable.
Nothing here overrides `tie_weights` (its signature changed between transformers releases, which is
what broke the reference's Hub code): the tied names are declared per model in `_tied_weights_keys`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .caduceus import Caduceus as Backbone
from .caduceus import CaduceusForMaskedLM as MaskedLMModules
from .caduceus import conjoined_hidden, init_weights, tied_parameter_names
from .configuration_caduceus import CaduceusConfig

# transformers 4.x copies into its module cache only the relative imports of the file it loads, not
# theirs: every model file is named here (and config.py, tokenizer.py in configuration_caduceus.py).
from .kernels import KERNEL_BACKENDS  # noqa: F401
from .mamba import Mamba  # noqa: F401
from .rcps import RCPSWrapper  # noqa: F401
from .scan import selective_scan  # noqa: F401


class CaduceusPreTrainedModel(PreTrainedModel):
    config_class = CaduceusConfig
    base_model_prefix = "caduceus"
    supports_gradient_checkpointing = True
    _no_split_modules = ("CaduceusBlock",)

    def __init__(self, config: CaduceusConfig):
        super().__init__(config)
        self.model_config = config.model_config()  # our dataclass, what the model modules take

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.backbone.embeddings.word_embeddings  # base_model: self, or self.caduceus

    def _init_weights(self, module: nn.Module) -> None:
        """The reference initialisation (docs/reference-model.md §7); a classifier's `score` ~ N(0, 0.02)."""
        if module is getattr(self, "score", None):
            nn.init.normal_(module.weight, std=self.model_config.initializer["initializer_range"])
        else:
            init_weights(module, self.model_config)

    def _finish_init(self) -> None:
        """Declare the tied names, per instance and from the modules themselves (which names share a tensor
        depends on the config), then run transformers' post_init (initialisation, tying)."""
        self._tied_weights_keys = tied_parameter_names(self)
        self.post_init()


class Caduceus(CaduceusPreTrainedModel):
    """The backbone: last_hidden_state (B, L, D), or (B, L, 2D) for PS (both RC halves)."""

    _auto_class = "AutoModel"  # save_pretrained writes this code along (transformers 4.x only did so when set)
    _keys_to_ignore_on_load_unexpected = (r"lm_head\.",)  # an MLM checkpoint's head is not part of this model

    def __init__(self, config: CaduceusConfig):
        super().__init__(config)
        self.backbone = Backbone(self.model_config).backbone
        self._finish_init()

    def forward(self, input_ids: Tensor, return_dict: bool | None = None, **_) -> BaseModelOutput | tuple:
        hidden = self.backbone(input_ids)
        return BaseModelOutput(last_hidden_state=hidden) if _as_dict(self, return_dict) else (hidden,)


class CaduceusForMaskedLM(CaduceusPreTrainedModel):
    """logits (B, L, 16) in fp32; `labels` use -100 for positions not scored (transformers' convention)."""

    _auto_class = "AutoModelForMaskedLM"

    def __init__(self, config: CaduceusConfig):
        super().__init__(config)
        modules = MaskedLMModules(self.model_config)
        self.caduceus, self.lm_head = modules.caduceus, modules.lm_head
        self._finish_init()

    def get_output_embeddings(self) -> nn.Module:
        return getattr(self.lm_head, "lm_head", self.lm_head)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, return_dict: bool | None = None,
                **_) -> MaskedLMOutput | tuple:
        logits = self.lm_head(self.caduceus(input_ids)).float()
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if _as_dict(self, return_dict):
            return MaskedLMOutput(loss=loss, logits=logits)
        return (logits,) if loss is None else (loss, logits)


class CaduceusForSequenceClassification(CaduceusPreTrainedModel):
    """Pooled, strand-conjoined hidden states -> `score` (D -> num_labels, no bias), initialised N(0, 0.02).

    PS is conjoined always (exactly RC-invariant); Ph with the reverse-complement pass when not training
    and `conjoin_eval` (the paper's post-hoc conjoining). Pooling skips [PAD] positions."""

    _auto_class = "AutoModelForSequenceClassification"
    _keys_to_ignore_on_load_unexpected = (r"lm_head\.",)

    def __init__(self, config: CaduceusConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.caduceus = Backbone(self.model_config)
        self.score = nn.Linear(self.model_config.d_model, config.num_labels, bias=False)
        self._finish_init()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, return_dict: bool | None = None,
                **_) -> SequenceClassifierOutput | tuple:
        if self.model_config.rcps or (self.config.conjoin_eval and not self.training):
            hidden = conjoined_hidden(self.caduceus.backbone, input_ids, self.model_config)
        else:
            hidden = self.caduceus(input_ids)
        logits = self.score(pool(hidden, input_ids != self.config.pad_token_id, self.config.pooling)).float()
        loss = None if labels is None else self._loss(logits, labels)
        if _as_dict(self, return_dict):
            return SequenceClassifierOutput(loss=loss, logits=logits)
        return (logits,) if loss is None else (loss, logits)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """transformers' problem types: regression (MSE), single- or multi-label classification."""
        problem = self.config.problem_type
        if problem is None:
            problem = ("regression" if self.num_labels == 1 else
                       "single_label_classification" if labels.dtype in (torch.long, torch.int) else
                       "multi_label_classification")
            self.config.problem_type = problem
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 else F.mse_loss(logits, labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())


def pool(hidden: Tensor, keep: Tensor, how: str) -> Tensor:
    """(B, L, D) -> (B, D) over the positions `keep` marks: their mean, or the first / last of them."""
    keep = keep.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1, 1)
    marked = torch.where(keep.bool(), positions, -1 if how == "last" else hidden.shape[1])
    index = (marked.amax(1) if how == "last" else marked.amin(1)).clamp(0, hidden.shape[1] - 1)
    return hidden.gather(1, index.unsqueeze(1).expand(-1, 1, hidden.shape[-1])).squeeze(1)


def _as_dict(model: PreTrainedModel, return_dict: bool | None) -> bool:
    return model.config.return_dict if return_dict is None else return_dict
