"""Read a DDP engine checkpoint (torch.distributed.checkpoint files of packed chunks) as one plain dict,
without a process group: {"model": ..., "optim": ..., "scaler": ...}, keyed by parameter name."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from caduceus_dist.engine.ddp import unpack


def read_ddp_checkpoint(step_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(step_dir / "dcp", Path(tmp) / "state.pt")
        packed = torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=False)
    skeleton = packed["skeleton"]
    if not isinstance(skeleton, io.BytesIO):  # dcp_to_torch_save may hand the stored bytes back decoded
        skeleton = io.BytesIO()
        torch.save(packed["skeleton"], skeleton)
    return unpack(packed["chunks"], skeleton)
