"""Read a DDP engine checkpoint (torch.distributed.checkpoint files) as one plain dict, without a process
group: {"model": ..., "optim": ..., "scaler": ...}, keyed by parameter name."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def read_ddp_checkpoint(step_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(step_dir / "dcp", Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=False)
