"""benchmarks/gpu_check.py, rehearsed on this CPU so that the script a lent GPU machine runs cannot rot:
bf16 steps, the figures it reports, and a checkpoint restored bitwise into a fresh engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearsal_on_cpu_measures_and_restores_bitwise(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--sizes", "ps_1k", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (result,) = report["results"]
    assert result["size"] == "ps_1k" and result["backend"] == "auto" and result["checkpoint_bitwise_equal"]
    assert result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0 and result["mfu"] is None  # no GPU peak
    assert "ps_1k    auto" in done.stdout


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("gpu_check: no CUDA device here")
