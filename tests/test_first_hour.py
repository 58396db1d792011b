"""A researcher's first hour: their own genome end to end, Ctrl-C that saves, one-line errors.

Every test runs the command a user types (data_prep/shard_genome.py, recipes/pretrain.py) as a real
process on real sequence (the embedded hg38 sample, re-packed as the user's own FASTA), and checks the
exit code, the one message the user sees, and what is (not) written.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caduceus_dist.config import load_job_config
from caduceus_dist.metrics.writer import cpu_peak_flops
from caduceus_dist.prep.cli import build_parser
from caduceus_dist.shard_format import read_index

REPO = Path(__file__).resolve().parents[1]
SHARD = REPO / "data_prep" / "shard_genome.py"
PRETRAIN = REPO / "recipes" / "pretrain.py"
DEMO = REPO / "recipes" / "cpu_demo.yaml"
# A fast run: tiny model, curriculum off (the documented override), one eval batch.
QUICK = ["model.d_model=16", "model.n_layer=1", "data.seq_len=128", "data.tokens_per_step=512", "data.curriculum={}",
         "train.max_steps=2", "train.eval_every=1", "train.eval_batches=1", "data.eval_batch_size=2",
         "logging.log_every=1", "data.num_workers=0", "data.verify=size", "checkpoint.every=1"]


def run(*args, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def chr22_piece() -> str:
    """The sample's real hg38 chr22 sequence (200 kb, soft-masking kept)."""
    text = gzip.decompress((REPO / "caduceus_dist" / "sample" / "hg38_sample.fa.gz").read_bytes()).decode()
    return "".join(text.split(">")[1].splitlines()[1:])


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))
    return path


@pytest.fixture(scope="module")
def one_chromosome(tmp_path_factory) -> Path:
    """A user's genome with a single chromosome, named as Ensembl names it ("20")."""
    return write_fasta(tmp_path_factory.mktemp("genome") / "chr20.fa", {"20": chr22_piece()})


# ---------------------------------------------------------------------------------------------- 1
def test_one_chromosome_holds_out_a_seeded_fraction_and_says_so(one_chromosome, tmp_path):
    args = [SHARD, "--fasta", one_chromosome, "--window", 4096, "--valid-fraction", 0.1, "--test-fraction", 0.1]
    result = run(*args, "--out", tmp_path / "a", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: held out 0.1 of the windows as valid and 0.1 of the windows as test at random" in result.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    counts = {split: info["windows"] for split, info in manifest["splits"].items()}
    total = sum(counts.values())
    assert total == 200_001 // 4096  # every window lands in exactly one split
    for split in ("valid", "test"):  # each window is held out with p = 0.1: within 4 sigma of 4.8 of 48
        assert 0 < counts[split] <= 0.1 * total + 4 * (0.1 * 0.9 * total) ** 0.5
    again = run(*args, "--out", tmp_path / "b", cwd=tmp_path)  # the same seed: the same bytes
    shards = [(s["sha256"], s["index_sha256"]) for info in manifest["splits"].values() for s in info["shards"]]
    other = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert again.returncode == 0 and shards == [(s["sha256"], s["index_sha256"])
                                                for info in other["splits"].values() for s in info["shards"]]


def test_one_chromosome_without_a_valid_split_trains_with_one_warning(one_chromosome, tmp_path):
    sharded = run(SHARD, "--fasta", one_chromosome, "--window", 4096, "--out", tmp_path / "shards", cwd=tmp_path)
    assert sharded.returncode == 0 and "warning: no 'valid' windows" in sharded.stderr
    result = run(PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'shards'}",
                 *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has no 'valid' windows, so this run does not validate" in warnings[0]
    assert "step      2/2" in result.stdout and "eval " not in result.stdout


def test_holding_out_the_only_chromosome_is_an_error(one_chromosome, tmp_path):
    result = run(SHARD, "--fasta", one_chromosome, "--window", 4096, "--valid-chroms", "20",
                 "--out", tmp_path / "s", cwd=tmp_path)
    assert result.returncode == 2
    assert "the train split is empty" in result.stderr and "--valid-fraction" in result.stderr
    assert not (tmp_path / "s" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------- 2
def test_reference_tiling_of_a_users_big_bed_rows_warns_and_reports_coverage(tmp_path, shared_data):
    fasta = shared_data / "genomes" / "more" / "Dmel_dm3_chr2R.softmasked.fa.gz"  # 21.1 Mbp, one record
    bed = tmp_path / "mine.bed"  # a user's BED: two big rows, as people write them for their own genome
    bed.write_text("chr2R\t0\t16000000\ttrain\nchr2R\t16000000\t21000000\tvalid\n")
    result = run(SHARD, "--fasta", fasta, "--bed", bed, "--out", tmp_path / "s", "--workers", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # two rows, each cut to its first 2^20 bases: 2 x 1,048,576 of 21,000,000 bases
    assert "BED intervals: 21.00 Mbp, of which 2.10 Mbp (10.0%) are in stored windows" in result.stderr
    assert "warning: the reference tiling keeps only the first 2^20 bases of each BED row" in result.stderr
    assert "--tiling tile covers whole rows" in result.stderr


def test_bed_coverage_line_for_the_reference_data_has_no_warning(tmp_path):
    result = run(SHARD, "--out", tmp_path / "s", cwd=tmp_path)  # the sample: BED rows shorter than a window
    assert result.returncode == 0 and "BED intervals: 0.22 Mbp" in result.stderr
    assert "reference tiling keeps only" not in result.stderr


# ---------------------------------------------------------------------------------------------- 3
def test_valid_chroms_match_with_or_without_the_chr_prefix(tmp_path):
    seq = chr22_piece()
    fasta = write_fasta(tmp_path / "two.fa", {"20": seq[:100_000], "21": seq[100_000:]})
    result = run(SHARD, "--fasta", fasta, "--window", 4096, "--valid-chroms", "chr20", "--out", tmp_path / "s",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["splits"]["valid"]["windows"] == 100_000 // 4096
    assert manifest["splits"]["train"]["windows"] == 100_001 // 4096
    wrong = run(SHARD, "--fasta", fasta, "--window", 4096, "--test-chroms", "chrQ", "--out", tmp_path / "t",
                cwd=tmp_path)
    assert wrong.returncode == 2
    assert "split 'test' is empty: --test-chroms chrQ selected no window" in wrong.stderr
    assert "2 contig(s): 20, 21" in wrong.stderr


# ---------------------------------------------------------------------------------------------- 4
def test_a_bed_passed_as_fasta_is_named_as_such(tmp_path):
    bed = REPO / "caduceus_dist" / "sample" / "hg38_sample_splits.bed"
    result = run(SHARD, "--fasta", bed, "--out", tmp_path / "s", cwd=tmp_path)
    assert result.returncode == 2 and "It looks like a BED file" in result.stderr
    assert "pass it with --bed" in result.stderr and "Traceback" not in result.stderr


def test_a_finished_rerun_says_nothing_was_written(tmp_path):
    assert run(SHARD, "--out", tmp_path / "s", cwd=tmp_path).returncode == 0
    again = run(SHARD, "--out", tmp_path / "s", cwd=tmp_path)
    assert again.returncode == 0 and "is already complete" in again.stderr and "nothing written" in again.stderr
    assert "Mbp/s" not in again.stderr


def test_a_download_that_received_nothing_mentions_no_part_file(tmp_path):
    from caduceus_dist.prep.download import DownloadError, download_file

    with pytest.raises(DownloadError) as caught:  # nothing listens on port 9 of this machine
        download_file("http://127.0.0.1:9/hg38.ml.fa.gz", tmp_path / "hg38.ml.fa.gz", retries=0, backoff=0)
    assert ".part" not in str(caught.value) and "download failed after 1 attempts" in str(caught.value)


def test_workers_help_is_a_whole_sentence():
    action = next(a for a in build_parser()._actions if "--workers" in a.option_strings)
    assert action.help.endswith("byte-identical for any number of workers")


# ---------------------------------------------------------------------------------------------- 5
def _start_long_run(tmp_path: Path, shards: Path, run_dir: Path, max_steps: int = 50) -> subprocess.Popen:
    """The demo model at 32k tokens per step (about 2 s a step here), in its own session like a terminal job."""
    return subprocess.Popen(
        [sys.executable, str(PRETRAIN), "--config", str(DEMO), f"run_dir={run_dir}", f"data.shards={shards}",
         "data.curriculum={}", "data.tokens_per_step=32768", f"train.max_steps={max_steps}", "train.eval_batches=0",
         "logging.log_every=1", "checkpoint.every=1000", "data.verify=size", "data.num_workers=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _read_until(proc: subprocess.Popen, needle: str, seen: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen.append(line)
            if needle in line:
                return
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"never printed {needle!r}:\n{''.join(seen)[-3000:]}")


def _ctrl_c(tmp_path: Path, shards: Path, run_dir: Path, presses: int) -> tuple[int, str]:
    """Press Ctrl-C once training runs (what a terminal does: SIGINT to the whole foreground group, data
    workers included), and again once the trainer has acknowledged the first press; (exit code, output)."""
    proc, seen = _start_long_run(tmp_path, shards, run_dir), []
    try:
        _read_until(proc, "step      1/50", seen)
        os.killpg(proc.pid, signal.SIGINT)
        if presses == 2:
            _read_until(proc, "Ctrl-C: saving a checkpoint at the end of this step", seen)
            os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "shards"
    subprocess.run([sys.executable, str(SHARD), "--out", str(out), "--quiet"], check=True, cwd=REPO)
    return out


@pytest.mark.slow
def test_ctrl_c_saves_at_the_step_boundary_and_the_same_command_resumes(tmp_path, sample_shards):
    run_dir = tmp_path / "run"
    returncode, output = _ctrl_c(tmp_path, sample_shards, run_dir, presses=1)
    assert returncode == 130, output[-3000:]
    assert "Traceback" not in output and "[rank0]" not in output
    saved = [line for line in output.splitlines() if line.startswith("stopped (Ctrl-C): checkpoint saved at step")]
    assert len(saved) == 1 and "run the same command again to resume" in saved[0]
    step = int(saved[0].split("step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"step_{step:06d}" / "manifest.json").exists()
    resumed = run(PRETRAIN, "--config", DEMO, f"run_dir={run_dir}", f"data.shards={sample_shards}", "data.curriculum={}",
                  "data.tokens_per_step=32768", f"train.max_steps={step + 1}", "train.eval_batches=0",
                  "data.verify=size", cwd=tmp_path)
    assert resumed.returncode == 0 and f"resumed at step {step}" in resumed.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, sample_shards):
    run_dir = tmp_path / "run"
    returncode, output = _ctrl_c(tmp_path, sample_shards, run_dir, presses=2)
    assert returncode == 130, output[-3000:]
    assert "stopped at once (Ctrl-C): nothing saved since the last checkpoint" in output
    assert "Traceback" not in output
    # the second press may land while the first press's save is being written: nothing half-written stays
    assert all((step / "manifest.json").exists() for step in (run_dir / "checkpoints").glob("step_*")), output


# ---------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_run_dir_names_the_key(tmp_path, sample_shards, where):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run" if where == "under_a_file" else Path("/proc/caduceus-run")
    result = run(PRETRAIN, "--config", DEMO, f"run_dir={run_dir}", f"data.shards={sample_shards}", *QUICK,
                 cwd=tmp_path)
    assert result.returncode == 2
    assert f"config error: run_dir: cannot write to {run_dir}" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_problems_exit_2_with_one_line(tmp_path, sample_shards):
    missing_split = run(PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'a'}", f"data.shards={sample_shards}",
                        "data.split=nosuch", *QUICK, cwd=tmp_path)
    assert missing_split.returncode == 2 and "data error:" in missing_split.stderr
    assert "has no split 'nosuch'" in missing_split.stderr and "Traceback" not in missing_split.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(sample_shards, damaged)
    for tar in sorted((damaged / "train").glob("*.tar")):  # break every run list's counts; sizes stay the same
        data = bytearray(tar.read_bytes())
        for runs_offset in read_index(tar.with_suffix(".idx"))[:, 4]:
            data[runs_offset:runs_offset + 4] = b"\xff\xff\xff\x7f"
        tar.write_bytes(bytes(data))
    result = run(PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'b'}", f"data.shards={damaged}", *QUICK,
                 "data.num_workers=1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and "has a corrupt runs member" in errors[0]
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr
    debug = run(PRETRAIN, "--debug", "--config", DEMO, f"run_dir={tmp_path / 'c'}", f"data.shards={damaged}",
                *QUICK, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug: the traceback too


def test_config_errors_are_one_line_without_omegaconf_internals(tmp_path):
    result = run(PRETRAIN, "--config", DEMO, "train.max_steps=abc", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: override 'train.max_steps=abc'")
    assert "reference_type" not in result.stderr and "object_type" not in result.stderr


# ---------------------------------------------------------------------------------------------- 7
def test_a_failed_relaunch_keeps_the_runs_config_and_the_documented_rerun_works(tmp_path, sample_shards):
    run_dir = tmp_path / "run"
    first = run(PRETRAIN, "--config", DEMO, f"run_dir={run_dir}", f"data.shards={sample_shards}", *QUICK,
                "train.max_steps=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    config = (run_dir / "config.yaml").read_bytes()
    bad = run(PRETRAIN, "--config", DEMO, f"run_dir={run_dir}", f"data.shards={sample_shards}", *QUICK,
              "model.d_model=32", cwd=tmp_path)
    assert bad.returncode == 2 and "resume error:" in bad.stderr and "model.d_model" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (run_dir / "config.yaml").read_bytes() == config and not list(run_dir.glob("config.*.yaml"))
    rerun = run(PRETRAIN, "--config", run_dir / "config.yaml", "train.max_steps=2", cwd=tmp_path)
    assert rerun.returncode == 0 and "resumed at step 1" in rerun.stdout


# ---------------------------------------------------------------------------------------------- 8
def test_resetting_the_curriculum_on_the_command_line_turns_it_off(tmp_path, sample_shards):
    assert load_job_config(DEMO).data.curriculum.enabled
    cfg = load_job_config(DEMO, ["data.curriculum={}"])
    assert not cfg.data.curriculum.enabled and cfg.data.seq_len == 512
    result = run(PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}",
                 "data.curriculum={}", "train.max_steps=1", "train.eval_batches=0", "data.verify=size", cwd=tmp_path)
    assert result.returncode == 0 and "| L 512 x global batch 4 = 2,048 tokens/step" in result.stdout


# ---------------------------------------------------------------------------------------------- 9
def test_rerunning_a_finished_run_says_it_is_finished(tmp_path, sample_shards):
    args = [PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}", *QUICK]
    assert run(*args, cwd=tmp_path).returncode == 0
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert "already finished: its checkpoint is at step 2 and train.max_steps is 2" in again.stdout
    assert "steps 2->2" not in again.stdout


# ---------------------------------------------------------------------------------------------- 10
def test_threads_come_from_the_cpus_available_and_are_reported(tmp_path, sample_shards):
    args = [PRETRAIN, "--config", DEMO, f"data.shards={sample_shards}", *QUICK, "train.max_steps=1"]
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, *map(str, args), f"run_dir={tmp_path / 'a'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert pinned.returncode == 0, pinned.stderr[-2000:]
    assert "1 CPU thread(s) per rank (1 CPU(s) available / 1 rank(s) on this host)" in pinned.stdout
    told = run(*args, f"run_dir={tmp_path / 'b'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert "1 CPU thread(s) per rank (OMP_NUM_THREADS)" in told.stdout
    assert "MFU against" in told.stdout and "fp32 FLOP/cycle" in told.stdout


def test_the_cpu_peak_is_stated_from_the_cpu_not_probed():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\ncpu MHz\t\t: 2600.000\n"
    peak, how = cpu_peak_flops(4, avx2)
    assert peak >= 4 * 2.6e9 * 32 and "4 thread(s) x" in how and "32 fp32 FLOP/cycle" in how
    old, _ = cpu_peak_flops(1, "flags\t: fpu sse2\ncpu MHz\t: 3000.0\n")
    assert old >= 3e9 * 8


# ---------------------------------------------------------------------------------------------- 12
def test_exports_are_readable_by_the_group_and_example_outputs_are_ignored(tmp_path):
    from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

    previous = os.umask(0o022)
    try:
        CaduceusForMaskedLM(CaduceusConfig(d_model=16, n_layer=1, vocab_size=12)).save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    ignored = subprocess.run(["git", "check-ignore", "exported/model.safetensors", "out/embeddings.npy",
                              "caduceus-1234.out", "runs/x/config.yaml", "data/shards/x"],
                             cwd=REPO, capture_output=True, text=True)
    assert len(ignored.stdout.split()) == 5, ignored.stdout


# ---------------------------------------------------------------------------------------------- 13
def test_ci_runs_exactly_the_readmes_test_command():
    readme = (REPO / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.startswith("bash scripts/setup.sh --test"))
    assert command.split("#")[0].strip() in (REPO / ".ci" / "run").read_text()


# ---------------------------------------------------------------------------------------------- 13, 14
def test_the_readme_leads_from_install_to_a_trained_checkpoint():
    readme = (REPO / "README.md").read_text()
    sections = [line[3:] for line in readme.splitlines() if line.startswith("## ")]
    wanted = ["Quickstart", "Train on your own genome", "GPU install", "Recipes", "Launching on SLURM",
              "Resuming, preemption and Ctrl-C", "Results"]
    assert [s for s in sections if s in wanted] == wanted  # in the order a researcher needs them
    assert "source .venv/bin/activate" in readme  # later sections use bare python / torchrun / tensorboard
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # PyPI's torch is the CUDA build
    assert "1.365" in readme and "python -m caduceus_dist.export" in readme
    for command in ("--valid-fraction", "--valid-chroms", "--tiling tile", "--contigs all"):
        assert command in readme.split("## GPU install")[0], command


# ---------------------------------------------------------------------------------------------- cluster issue, item 8
@pytest.mark.parametrize(("name", "key"), [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                           ("NVIDIA GeForce RTX 4090", "4090"), ("NVIDIA L40", "L40"),
                                           ("NVIDIA L40S", None), ("NVIDIA B200", None), ("AMD Instinct MI300X", None)])
def test_gpu_peaks_match_whole_device_names_and_unknown_gpus_report_no_mfu(name, key):
    from caduceus_dist.metrics.writer import GPU_PEAK_FLOPS, gpu_peak_flops, train_line

    peak, how = gpu_peak_flops(name)
    assert peak == (GPU_PEAK_FLOPS[key] if key else None)
    if key is None:  # no guess and no crash at start-up: the console says MFU is not available
        assert "MFU not reported" in how
        line = train_line(1, 2, {"train/loss": 1.0, "train/accuracy": 0.5, "train/lr": 1e-3, "train/grad_norm": 1.0,
                                 "perf/tokens_per_s": 1.0, "perf/tokens_per_s_per_device": 1.0, "data/seq_len": 8,
                                 "data/stage": 0, "perf/peak_memory_gib": 0.1, "perf/step_time_s": 0.1,
                                 "perf/data_wait_fraction": 0.0, "data/consumed_tokens": 8})
        assert "| mfu n/a |" in line


def test_evaluation_runs_the_model_in_eval_mode_and_training_resumes_in_train_mode(tmp_path, sample_shards,
                                                                                   monkeypatch, free_port):
    import torch.distributed as dist

    from caduceus_dist.train.trainer import Trainer

    # the in-process trainer's one-rank group must leave nothing behind for tests that start processes
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port)}.items():
        monkeypatch.setenv(key, value)
    cfg = load_job_config(DEMO, [f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}", *QUICK])
    trainer = Trainer(cfg)
    try:
        modes: list[bool] = []
        trainer.engine.module.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        trainer.evaluate(0)
        assert modes and not any(modes) and trainer.engine.module.training
    finally:
        trainer.close()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- cluster issue, item 4
@pytest.mark.slow
@pytest.mark.parametrize(("start_method", "signum"), [("fork", signal.SIGUSR2), ("spawn", signal.SIGUSR2),
                                                       ("spawn", signal.SIGTERM)])
def test_a_preemption_signal_to_the_whole_job_saves_with_any_worker_start_method(tmp_path, sample_shards,
                                                                                   start_method, signum):
    """SLURM's SIGTERM and the forwarded USR2 (scancel --signal) reach the DataLoader workers too, whatever
    starts them (spawn and forkserver workers do not inherit the trainer's handlers). Workers ignore USR2
    and die of SIGTERM (multiprocessing needs it to stop them); either way the trainer saves at the step
    boundary and exits 75 (requeue me), never 1."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), "--config", str(DEMO), f"run_dir={run_dir}", f"data.shards={sample_shards}",
         "data.curriculum={}", "data.tokens_per_step=32768", "train.max_steps=50", "train.eval_batches=0",
         "logging.log_every=1", "checkpoint.every=1000", "data.verify=size", "data.num_workers=2",
         f"data.worker_start_method={start_method}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: list[str] = []
    try:
        _read_until(proc, "step      1/50", seen)
        os.killpg(proc.pid, signum)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    output = "".join(seen) + rest
    assert proc.returncode == 75, output[-3000:]
    assert "preempted: checkpoint saved at step" in output and "Traceback" not in output
