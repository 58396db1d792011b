"""The transformers tokenizer of a Hugging Face export (AutoTokenizer, trust_remote_code=True).

The reference vocabulary of tokenizer.py (docs/reference-model.md §8): one token per base after
upper-casing, anything else [UNK]. Unlike the reference's Hub tokenizer it appends no [SEP] by
default: the MLM models are trained on windows without one (docs/reference-recipe.md), so embeddings
and variant scores of a plain sequence are what the model saw in pretraining (docs/inference.md §1).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizer

from .tokenizer import UNK_ID, VOCAB


class CaduceusTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids"]  # noqa: RUF012 (transformers reads this class attribute)

    def __init__(self, model_max_length: int = 131072, padding_side: str = "left", **kwargs):
        self._ids = dict(VOCAB)
        self._tokens = {i: t for t, i in VOCAB.items()}
        specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "bos_token": "[BOS]", "eos_token": "[SEP]",
                    "mask_token": "[MASK]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
        super().__init__(model_max_length=model_max_length, padding_side=padding_side, **(specials | kwargs))

    @property
    def vocab_size(self) -> int:
        return len(self._ids)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text.upper())

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens.get(index, "[UNK]")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def build_inputs_with_special_tokens(self, ids: list[int], pair: list[int] | None = None) -> list[int]:
        return ids if pair is None else [*ids, self.sep_token_id, *pair]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is fixed in tokenizer.py, which ships with the export
