"""SLURM launchers: a Submitit job with automatic requeue, and the per-node torchrun of slurm/pretrain.sh.

    python -m caduceus_dist.launch --config recipes/ps_131k.yaml --nodes 2 --gpus-per-node 8 \
        [--partition P --account A --time 24:00:00] [key=value ...]
    python -m caduceus_dist.launch --config recipes/cpu_demo.yaml --local --gpus-per-node 0 --tasks-per-node 2 --wait
    python -m caduceus_dist.launch torchrun [torchrun options] recipes/pretrain.py --config ...
    eval "$(python -m caduceus_dist.launch rendezvous)"     # MASTER_ADDR / MASTER_PORT of a SLURM job
    python -m caduceus_dist.launch preempted --config ...    # exit 0: this attempt stopped for a requeue

Submitit runs one task per rank (tasks = nodes x GPUs per node); each task starts `recipes/pretrain.py`
as a child with torch.distributed's environment derived from SLURM's. Preemption and the pre-timeout
signal reach the trainer's preemption flag (SLURM signals every process of the step; rank 0's
`checkpoint()` also forwards it), the ranks save together and exit 75, and only then does rank 0
requeue the job through Submitit. Saving inside `checkpoint()` would be wrong: Submitit calls it on
rank 0 only, from a signal handler. The requeued job runs the same command on the same run directory,
so it resumes from `checkpoints/latest`.

`torchrun` mode is torchrun with two changes for batch scripts: the node rank defaults to SLURM_NODEID,
and the exit code survives (torchrun turns any worker failure into 1; here, workers that all exit 75
make the node exit 75, so the batch script can tell "requeue me" from a real failure).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from caduceus_dist.errors import EXIT_PREEMPTED

PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
ENTRY_POINT = Path(__file__).resolve().parents[1] / "recipes" / "pretrain.py"


# ----------------------------------------------------------------------------------------------------
# Addresses and ports shared by both launchers


def node_address(node: str) -> str:
    """An address for `node`: DNS if it resolves, else the NodeAddr SLURM itself uses to reach it."""
    try:
        return socket.gethostbyname(node)
    except OSError:
        pass
    try:
        shown = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    found = re.search(r"\bNodeAddr=(\S+)", shown)
    return found.group(1) if found else node


def job_port(job_id: str) -> int:
    """The rendezvous port of a job: MASTER_PORT if set, else derived from the job id (stable across requeues)."""
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + number % 20000


def rendezvous(argv: list[str]) -> int:
    """Print `MASTER_ADDR=... MASTER_PORT=...` for the batch script of a SLURM job (the first node of the
    allocation), so slurm/pretrain.sh and the Submitit launcher derive them the same way."""
    try:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    except (KeyError, OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"rendezvous: needs a SLURM job (SLURM_JOB_NODELIST, SLURM_JOB_ID) and scontrol: {err}") from None
    print(f"MASTER_ADDR={shlex.quote(node_address(nodes[0]))} MASTER_PORT={job_port(os.environ['SLURM_JOB_ID'])}")
    return 0


# ----------------------------------------------------------------------------------------------------
# torchrun for batch scripts


def _ignore_preemption_signals() -> None:
    """Ignore the preemption signals here and, through exec, in the trainer until it installs its own
    handlers: a signal that lands during start-up must not kill a rank (the launchers repeat it)."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def torchrun(argv: list[str]) -> int:
    """Run torchrun; return 75 when every failed worker exited 75, else its usual outcome."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    def given(*names: str) -> bool:
        return any(arg.startswith(names) for arg in argv)

    if "SLURM_NODEID" in os.environ and not given("--node-rank", "--node_rank"):
        argv = [f"--node-rank={os.environ['SLURM_NODEID']}", *argv]
    # SLURM signals every process of the step, workers included, so the agent itself ignores the
    # preemption signals: torchrun's own handling would kill the workers in the middle of their save.
    if not given("--signals-to-handle", "--signals_to_handle"):
        argv = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *argv]
    _ignore_preemption_signals()
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        print(err.format_msg(), file=sys.stderr, flush=True)
        if codes == [EXIT_PREEMPTED]:
            return EXIT_PREEMPTED
        return codes[0] if len(codes) == 1 and 0 < codes[0] < 256 else 1
    return 0


# ----------------------------------------------------------------------------------------------------
# The Submitit job


@dataclass
class PretrainJob:
    """One task of the job: runs the trainer as a child process and turns its exit code into a
    result (0), a requeue (75, through Submitit's checkpoint path) or a failure (anything else)."""

    command: list[str]
    cwd: str
    forward_every_s: float = 10.0
    _child: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}

    def _environment(self) -> dict[str, str]:
        import submitit

        job = submitit.JobEnvironment()
        env = dict(os.environ)
        env.update(
            RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
            LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes), GROUP_RANK=str(job.node),
            MASTER_ADDR=node_address(job.hostnames[0]), MASTER_PORT=str(job_port(str(job.job_id))),
        )
        return env

    def _resubmission(self):
        import submitit

        return submitit.helpers.DelayedSubmission(PretrainJob(self.command, self.cwd, self.forward_every_s))

    def _wait(self, forward: int | None = None) -> int:
        """Poll (never block in Popen.wait: Submitit's handler runs on this thread and waits too)."""
        last = 0.0
        while (code := self._child.poll()) is None:
            if forward is not None and time.monotonic() - last >= self.forward_every_s:
                last = time.monotonic()
                self._child.send_signal(forward)
            time.sleep(0.2)
        return code

    def __call__(self) -> str:
        import submitit

        env = self._environment()
        rank = int(env["RANK"])
        print(f"[launch] rank {rank}/{env['WORLD_SIZE']} master {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
              f"SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')}: {' '.join(self.command)}", flush=True)
        self._child = subprocess.Popen(self.command, cwd=self.cwd, env=env, preexec_fn=_ignore_preemption_signals)
        code = self._wait()
        if code == 0:
            return "finished"
        if code == EXIT_PREEMPTED:
            if rank == 0:
                # Preempted without Submitit's signal reaching this task (e.g. SIGTERM to the trainer):
                # take the same path as Submitit's own signal, which calls checkpoint() and requeues.
                os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
                time.sleep(60)  # the handler exits this process
            return "preempted"
        raise RuntimeError(f"training exited with code {code} (not a preemption, so the job is not requeued); "
                           "its error is in this task's log above")

    def checkpoint(self, *args, **kwargs):
        """Rank 0, inside Submitit's signal handler: make sure the trainer saw the signal, wait for the
        collective checkpoint, then requeue with the same command (auto-resume from latest)."""
        import submitit

        if self._child is None:  # signalled before the trainer started: just run again
            return self._resubmission()
        print("[launch] preemption/timeout signal: waiting for the trainer's collective checkpoint", flush=True)
        code = self._wait(forward=submitit.JobEnvironment._usr_sig())
        if code not in (EXIT_PREEMPTED, 0):
            print(f"[launch] the trainer exited with code {code} while saving: not requeueing", flush=True)
            return None
        print(f"[launch] trainer exited with {code}: requeueing; the next run resumes from latest", flush=True)
        return self._resubmission()


# ----------------------------------------------------------------------------------------------------
# Command line


def _minutes(text: str) -> int:
    """Minutes in a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (seconds round up)."""
    days, dash, clock = text.partition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in clock.split(":")]
        if dash:  # D-HH[:MM[:SS]]
            hours, minutes, seconds = [*parts, 0, 0][:3]
        else:  # MM, MM:SS, HH:MM:SS
            hours, minutes, seconds = {1: (0, *parts, 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
        total = int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    except (ValueError, KeyError):
        raise SystemExit(f"--time {text!r} is not a SLURM time limit (MM, HH:MM:SS or D-HH:MM:SS)") from None
    return total


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m caduceus_dist.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. recipes/ps_131k.yaml")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="training processes per node (default: GPUs per node, or 1 on CPU nodes)")
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem-gb", type=int, default=None)
    parser.add_argument("--partition", default=env("SBATCH_PARTITION"), help="default: $SBATCH_PARTITION")
    parser.add_argument("--account", default=env("SBATCH_ACCOUNT"), help="default: $SBATCH_ACCOUNT")
    parser.add_argument("--qos", default=env("SBATCH_QOS"), help="default: $SBATCH_QOS")
    parser.add_argument("--time", default=env("SBATCH_TIMELIMIT", "24:00:00"),
                        help="time limit, SLURM format (default: $SBATCH_TIMELIMIT or 24:00:00)")
    parser.add_argument("--grace", type=int, default=300,
                        help="seconds before the time limit at which the job is told to checkpoint (USR2)")
    parser.add_argument("--max-requeues", type=int, default=50, help="requeues after time-outs before giving up")
    parser.add_argument("--job-name", default="caduceus")
    parser.add_argument("--folder", default=None, help="Submitit logs and pickles (default: RUN_DIR/submitit)")
    parser.add_argument("--local", action="store_true", help="run the same job on this machine (no SLURM)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its status")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def build_executor(args: argparse.Namespace, folder: Path):
    import submitit

    tasks = args.tasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    timeout_min = _minutes(args.time)
    if args.local:
        if args.nodes != 1:
            raise SystemExit("--local runs on this machine: use --nodes 1")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=timeout_min, tasks_per_node=tasks, nodes=1,
                                   gpus_per_node=args.gpus_per_node, signal_delay_s=args.grace)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    params = dict(nodes=args.nodes, ntasks_per_node=tasks, time=timeout_min, signal_delay_s=args.grace,
                  job_name=args.job_name, additional_parameters={"requeue": True})
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    optional = dict(partition=args.partition, account=args.account, qos=args.qos,
                    cpus_per_task=args.cpus_per_task, mem=f"{args.mem_gb}G" if args.mem_gb else None)
    params.update({key: value for key, value in optional.items() if value})
    executor.update_parameters(**params)
    return executor


def submit(argv: list[str]):
    """Validate the config here (a bad key fails before anything is queued), then submit one job."""
    from caduceus_dist.config import ConfigError, load_job_config

    args = parse_args(argv)
    if not ENTRY_POINT.exists():
        raise SystemExit(f"{ENTRY_POINT} not found: the launcher runs from a caduceus-dist checkout")
    config = str(Path(args.config).resolve())
    try:
        cfg = load_job_config(config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    run_dir = Path(cfg.run_dir).resolve()
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit"
    executor = build_executor(args, folder)
    task = PretrainJob([sys.executable, str(ENTRY_POINT), "--config", config, *overrides], cwd=os.getcwd())
    job = executor.submit(task)
    print(f"submitted job {job.job_id}: run_dir {run_dir}, logs {job.paths.stdout}", flush=True)
    return job, args


def preempted(argv: list[str]) -> int:
    """Exit 0 when the run's own files say that this job attempt stopped for a requeue (see
    manifest.preemption_verdict), 1 otherwise; one line saying why either way."""
    from caduceus_dist.checkpoint.manifest import CHECKPOINTS, preemption_verdict
    from caduceus_dist.config import ConfigError, load_job_config

    parser = argparse.ArgumentParser(prog="python -m caduceus_dist.launch preempted")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(load_job_config(args.config, args.overrides).run_dir)
    except ConfigError as err:
        print(f"cannot read the run's config: {err}", flush=True)
        return 1
    requeue, why = preemption_verdict(run_dir / CHECKPOINTS)
    print(why, flush=True)
    return 0 if requeue else 1


# helpers of slurm/pretrain.sh, by first argument; anything else submits a Submitit job
SUBCOMMANDS = {"torchrun": torchrun, "rendezvous": rendezvous, "preempted": preempted}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    job, args = submit(argv)
    if not args.wait:
        return 0
    try:
        print(f"job {job.job_id}: {job.results()[0]}", flush=True)  # rank 0 speaks for the job
    except Exception as err:  # submitit re-raises the task's failure here
        print(f"job {job.job_id} failed: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
