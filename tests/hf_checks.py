"""What a user does with an export through transformers' Auto classes; run by tests/test_huggingface.py
in this interpreter (transformers 5.x) and, as a script, under transformers 4.46.

    python tests/hf_checks.py EXPORT_DIR   (prints "ok" or fails with an assertion)
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

COMPLEMENT = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10, 9, 8, 7, 11, 12, 13, 14, 15])


def reverse_complement(ids: torch.Tensor) -> torch.Tensor:
    return COMPLEMENT[ids].flip(-1)


def dna_ids(batch: int = 2, length: int = 41, seed: int = 0) -> torch.Tensor:
    return torch.randint(7, 12, (batch, length), generator=torch.Generator().manual_seed(seed))  # A C G T N


def load_all(path: str) -> dict[str, torch.nn.Module]:
    kwargs = {"trust_remote_code": True}
    return {
        "mlm": AutoModelForMaskedLM.from_pretrained(path, **kwargs).eval(),
        "base": AutoModel.from_pretrained(path, **kwargs).eval(),
        "classifier": AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, **kwargs).eval(),
    }


def check_export(path: str) -> dict[str, torch.Tensor]:
    """Loads, ties, initialises the classifier head, keeps strand symmetry, re-saves; returns outputs to compare."""
    models = load_all(path)
    mlm, base, classifier = models["mlm"], models["base"], models["classifier"]
    head = mlm.get_output_embeddings().weight
    assert head is mlm.get_input_embeddings().weight or head is mlm.get_input_embeddings().embedding.weight
    for model in models.values():  # the directions' tied projections survive loading (4.46 splits them otherwise)
        mixers = [m for m in model.modules() if getattr(m, "mamba_rev", None) is not None]
        assert mixers and all(m.mamba_rev.in_proj.weight is m.mamba_fwd.in_proj.weight
                              and m.mamba_rev.out_proj.weight is m.mamba_fwd.out_proj.weight for m in mixers)
    score = classifier.score.weight
    assert torch.isfinite(score).all() and 0.01 < score.std().item() < 0.03, score.std()  # N(0, 0.02), not garbage
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert tokenizer("ACGTNacgtx[MASK]")["input_ids"] == [7, 8, 9, 10, 11, 7, 8, 9, 10, 6, 3]  # no [SEP] appended
    assert tokenizer(["ACG", "ACGTA"], padding=True)["input_ids"][0] == [4, 4, 7, 8, 9]  # left padding with [PAD]
    ids = dna_ids()
    assert tokenizer.decode(ids[0].tolist()) == "".join("ACGTN"[i - 7] for i in ids[0].tolist())
    with torch.no_grad():
        logits = mlm(ids).logits
        hidden = base(ids).last_hidden_state
        classes = classifier(ids).logits
        classes_rc = classifier(reverse_complement(ids)).logits
    torch.testing.assert_close(classes, classes_rc, rtol=1e-5, atol=1e-5)  # conjoined: strand-invariant
    labels = torch.tensor([0, 2])
    classifier.train()
    loss = classifier(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 5 and classifier.score.weight.grad.abs().sum() > 0
    with tempfile.TemporaryDirectory() as again:  # a fine-tuned model saved by transformers loads back
        mlm.save_pretrained(again)
        with torch.no_grad():
            reloaded = AutoModelForMaskedLM.from_pretrained(again, trust_remote_code=True).eval()(ids).logits
        assert torch.equal(reloaded, logits)
    return {"ids": ids, "logits": logits, "hidden": hidden}


if __name__ == "__main__":
    torch.save(check_export(sys.argv[1]), sys.argv[2])
    print("ok")
