"""What a training step costs the host: on the steps that are not reported, our code reads one value
from the device (the preemption agreement) and launches two collectives (the global target count and
that agreement), on two real gloo ranks. Before, every step read each micro-batch's loss, hits and
target count, the gradient norm and three reductions on the host (cluster issue, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rank_scripts import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 8, 4

RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist

counts = {"host_reads": 0, "collectives": 0}

def ours(frame):  # the step's code, not the loader's (its CPU reads are no device syncs)
    name = frame.f_globals.get("__name__", "")
    return name.startswith("caduceus_dist") and not name.startswith("caduceus_dist.data")

def counting(kind, original):
    def wrapper(*args, **kwargs):
        if kind == "collectives" or ours(sys._getframe(1)):
            counts[kind] += 1
        return original(*args, **kwargs)
    return wrapper

for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, method, counting("host_reads", getattr(torch.Tensor, method)))
for function in ("all_reduce", "all_gather_object", "broadcast_object_list", "barrier", "all_gather"):
    setattr(dist, function, counting("collectives", getattr(dist, function)))

from caduceus_dist.config import load_job_config
from caduceus_dist.train.trainer import Trainer

cfg = load_job_config(sys.argv[1], sys.argv[2:])
trainer = Trainer(cfg)
per_step, after_step = [], trainer.manager.after_step

def recording(step, client_state_fn):
    result = after_step(step, client_state_fn)
    per_step.append(dict(counts))
    return result

trainer.manager.after_step = recording
code = trainer.run()
print("RESULT " + json.dumps({"code": code, "per_step": per_step}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_unreported_steps_read_one_value_and_launch_two_collectives(embedded_sample_shards, tmp_path, free_port,
                                                                    engine):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.shards={embedded_sample_shards}", f"engine.name={engine}",
                 "model.d_model=16", "model.n_layer=1", "data.seq_len=128", "data.tokens_per_step=1024",
                 "data.curriculum={}", "train.grad_accum=2", f"train.max_steps={STEPS}", "train.eval_batches=0",
                 f"logging.log_every={LOG_EVERY}", "data.num_workers=0", "data.verify=size", "checkpoint.every=0"]
    results = run_on_ranks(RANK_SCRIPT, [str(REPO / "recipes" / "cpu_demo.yaml"), *overrides], free_port,
                           cwd=tmp_path)
    assert all(r["code"] == 0 for r in results), results
    for result in results:
        cumulative = [{"host_reads": 0, "collectives": 0}, *result["per_step"]]
        steps = {step: {kind: cumulative[step][kind] - cumulative[step - 1][kind] for kind in cumulative[0]}
                 for step in range(2, STEPS + 1)}  # step 1 also pays for the start-up
        quiet = {step: cost for step, cost in steps.items() if step % LOG_EVERY and step != STEPS}
        assert sorted(quiet) == [2, 3, 5, 6, 7]
        assert all(cost == {"host_reads": 1, "collectives": 2} for cost in quiet.values()), steps
        assert steps[LOG_EVERY]["host_reads"] > 1 and steps[LOG_EVERY]["collectives"] > 2, steps  # a report
