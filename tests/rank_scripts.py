"""Run a Python script as several real gloo ranks on this machine and collect what each rank reports.

A rank reports by printing one line `RESULT <json>`; a rank that prints none fails the test with the
ranks' output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_on_ranks(script: str, args: list[str], port: int, world: int = 2, cwd: Path | None = None,
                 timeout: float = 300, env: dict[str, str] | None = None) -> list[dict]:
    """Each rank's report, in rank order; `env` adds to (or overrides) the ranks' environment."""
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=cwd)
             for rank in range(world)]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == world, "\n".join(out[-3000:] for out in outputs)
    return results
