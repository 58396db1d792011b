"""Character tokenizer with the reference Caduceus vocabulary (docs/reference-model.md §8).

Encoding goes through a 256-entry lookup table so that a 249 Mbp chromosome is tokenized by one
numpy gather, never by a per-character Python loop.
"""

from __future__ import annotations

import numpy as np

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
NUCLEOTIDES = ("A", "C", "G", "T", "N")
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + NUCLEOTIDES)}

CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = (VOCAB[c] for c in NUCLEOTIDES)
VOCAB_SIZE = len(VOCAB)  # 12; the model pads its embedding to 16

# Specials and N map to themselves; A<->T, C<->G.
COMPLEMENT_MAP: dict[int, int] = {i: i for i in range(VOCAB_SIZE)} | {
    A_ID: T_ID, T_ID: A_ID, C_ID: G_ID, G_ID: C_ID,
}

IUPAC_AMBIGUOUS = b"RYSWKMBDHVU"  # valid FASTA letters that are not A/C/G/T/N


def _byte_table() -> np.ndarray:
    table = np.full(256, UNK_ID, dtype=np.uint8)
    for letter, token in zip(b"ACGTN", (A_ID, C_ID, G_ID, T_ID, N_ID), strict=True):
        table[letter] = token
        table[letter + 32] = token  # lower case (soft-masked) letters
    return table


BYTE_TO_ID = _byte_table()
ID_TO_BYTE = np.frombuffer(b"".join(t.encode() if len(t) == 1 else b"?" for t in VOCAB), dtype=np.uint8)
COMPLEMENT_IDS = np.array([COMPLEMENT_MAP[i] for i in range(VOCAB_SIZE)], dtype=np.uint8)


class CaduceusTokenizer:
    """One token per base, upper-cased; anything outside ACGTN becomes [UNK] (id 6)."""

    vocab = VOCAB
    complement_map = COMPLEMENT_MAP
    pad_token_id = PAD_ID
    mask_token_id = MASK_ID
    unk_token_id = UNK_ID

    def __len__(self) -> int:
        return VOCAB_SIZE

    @staticmethod
    def encode_bytes(seq: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """Token ids (uint8) for raw sequence bytes."""
        raw = seq if isinstance(seq, np.ndarray) else np.frombuffer(seq, dtype=np.uint8)
        return BYTE_TO_ID[raw]

    def encode(self, seq: str) -> np.ndarray:
        return self.encode_bytes(seq.encode("ascii", errors="replace"))

    @staticmethod
    def decode(ids: np.ndarray) -> str:
        """Bases for ids 7..11; special tokens decode to '?'."""
        return ID_TO_BYTE[np.asarray(ids, dtype=np.int64)].tobytes().decode("ascii")

    @staticmethod
    def reverse_complement(ids: np.ndarray) -> np.ndarray:
        return COMPLEMENT_IDS[np.asarray(ids)[..., ::-1]]
