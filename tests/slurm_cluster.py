"""A real two-node SLURM cluster on this machine, for the launcher tests (import `slurm_cluster`).

Debian's slurm-wlm and munge (installed with apt when missing and we are root): one munged, one
slurmctld and two slurmd daemons, nodes `n1` and `n2`, each with its own port on 127.0.0.1. The
config lives in its own folder and is selected with SLURM_CONF, so a machine's /etc/slurm is never
touched. Daemons are stopped by their pid files, never by name. Settings that make tests fast:
`AuthInfo=cred_expire=10` (a requeued job starts again after ~11 s, not 121 s; only a slurmctld
restart applies it) and 2 s scheduler intervals.

    python tests/slurm_cluster.py up|down|status   # the same cluster by hand, for debugging
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_DIR = Path(os.environ.get("CADUCEUS_SLURM_DIR", "/tmp/caduceus-slurm"))
PACKAGES = ("slurm-wlm", "munge")
NODES = ("n1", "n2")
MUNGE_PID = Path("/run/munge/munged.pid")
HOSTS_LINE = "127.0.0.1 n1 n2"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    started_munge: bool = False
    nodes: tuple[str, ...] = NODES

    def env(self) -> dict[str, str]:
        """The environment every SLURM client command (and the jobs it submits) must see."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _conf_text(root: Path) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={17001 + i} CPUs={cpus} RealMemory=2000"
        for i, name in enumerate(NODES)
    )
    return f"""\
# written by tests/slurm_cluster.py; two slurmd "nodes" on one host
ClusterName=caduceus-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MinJobAge=600
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError, PermissionError):
        return None


def _stop(pid_file: Path, timeout: float = 15.0) -> None:
    """SIGTERM the daemon named by `pid_file` and wait until it is gone (SIGKILL as a last resort)."""
    pid = _pid_alive(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _daemon_pid_files(root: Path) -> list[Path]:
    return [*(root / f"slurmd-{n}.pid" for n in NODES), root / "slurmctld.pid"]


def why_unavailable() -> str | None:
    """The reason a cluster cannot be started here, or None; installs the packages when it can."""
    if sys.platform != "linux":
        return "the SLURM tests need Linux"
    if os.geteuid() != 0:
        return "the SLURM tests start munged/slurmctld/slurmd and need root (CI runs them as root)"
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0] \
        if shutil.which("dpkg") else list(PACKAGES)
    if missing:
        if not shutil.which("apt-get"):
            return f"Debian packages {missing} are not installed and apt-get is not available"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return f"could not install {list(PACKAGES)} ({' '.join(cmd)}): {done.stderr.strip()[-300:]}"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if not (shutil.which(tool) or Path("/usr/sbin", tool).exists()):
            return f"{tool} is not installed although {list(PACKAGES)} are"
    return None


def _ensure_hosts() -> None:
    """Node names must resolve (launchers take MASTER_ADDR from the node list); append them if absent."""
    try:
        socket.gethostbyname("n1")
        socket.gethostbyname("n2")
    except OSError:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"\n{HOSTS_LINE}\n")


def _ensure_munge() -> bool:
    """Start munged unless one runs already; True when we started it (and so must stop it)."""
    if _pid_alive(MUNGE_PID):
        return False
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    return True


def start(root: Path = CLUSTER_DIR, timeout: float = 60.0) -> SlurmCluster:
    """A fresh cluster (any earlier one of ours stopped, its job state wiped), both nodes idle."""
    stop(root)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf_text(root))
    _ensure_hosts()
    cluster = SlurmCluster(root, conf, started_munge=_ensure_munge())
    env = cluster.env()
    subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf)], check=True, env=env)
    for node in NODES:
        subprocess.run(["/usr/sbin/slurmd", "-f", str(conf), "-N", node], check=True, env=env)
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env)
        states = done.stdout.strip()
        if done.returncode == 0 and sorted(states.splitlines()) == [f"{n} idle" for n in NODES]:
            return cluster
        time.sleep(0.5)
    stop(root, munge=cluster.started_munge)
    raise RuntimeError(f"SLURM nodes did not become idle within {timeout:.0f} s (sinfo: {states!r}); "
                       f"see {root}/log/slurmctld.log and slurmd-n*.log")


def stop(root: Path = CLUSTER_DIR, munge: bool = False) -> None:
    """Stop our slurmd and slurmctld daemons by their pid files; munged too when `munge` (we started it)."""
    for pid_file in _daemon_pid_files(root):
        _stop(pid_file)
    if munge:
        _stop(MUNGE_PID)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Session-wide real cluster; skips with the reason where one cannot run. Sets SLURM_CONF."""
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stop(cluster.root, munge=cluster.started_munge)


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    if action == "up":
        problem = why_unavailable()
        if problem:
            sys.exit(problem)
        started = start()
        print(f"export SLURM_CONF={started.conf}")
    elif action == "down":
        stop(munge=True)
    else:
        print({str(p): _pid_alive(p) for p in _daemon_pid_files(CLUSTER_DIR)})
