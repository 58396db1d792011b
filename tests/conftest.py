"""Shared test fixtures: where the data is, the gpu/shared-data skips, per-test ports."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# verified-shard stamps of this session's shard directories stay out of the user's ~/.cache
os.environ.setdefault("CADUCEUS_CACHE", tempfile.mkdtemp(prefix="caduceus-test-cache-"))
# and so does transformers' copy of the exports' remote code
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="caduceus-test-hf-modules-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "caduceus_dist" / "sample"
SHARED_DATA = Path(os.environ.get("CADUCEUS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (the CPU path is tested instead)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


PREEMPTION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def signal_handlers_are_given_back():
    """Code that installs preemption handlers in-process (CheckpointManager, Trainer) must give them back,
    on errors too: a leaked handler silently changes how later code in the process reacts to signals."""
    before = {signum: signal.getsignal(signum) for signum in PREEMPTION_SIGNALS}
    yield
    leaked = [signum.name for signum, handler in before.items() if signal.getsignal(signum) is not handler]
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, before[signum])
    assert not leaked, f"signal handlers left installed: {leaked}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real genomes of ../shared/data (CI has them; a user's clone may not)."""
    if not (SHARED_DATA / "grch37_chr20.fa.gz").exists():
        pytest.skip(f"real genome data not found at {SHARED_DATA} (set CADUCEUS_SHARED_DATA); core tests use the sample")
    return SHARED_DATA


@pytest.fixture
def free_port() -> int:
    """A TCP port that is free now, so concurrent distributed tests never share a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_sample_shards(tmp_path_factory) -> Path:
    """The embedded hg38 sample, sharded once per session with the command a user runs."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("embedded-sample") / "shards"
    subprocess.run([sys.executable, str(REPO_ROOT / "data_prep" / "shard_genome.py"), "--out", str(out), "--quiet"],
                   check=True, cwd=REPO_ROOT)
    return out


@pytest.fixture(scope="module", params=["Ph", "PS"])
def tiny_export(request, tmp_path_factory) -> Path:
    """A seeded d_model 32, 2-layer model of each variant, saved in the Hugging Face layout."""
    import torch

    from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12, rcps=request.param == "PS"))
    return model.save_pretrained(tmp_path_factory.mktemp(request.param) / "export")
