#!/usr/bin/env bash
# Pretrain Caduceus on SLURM: one torchrun per node, automatic requeue on preemption or time limit.
#
#   sbatch slurm/pretrain.sh [RECIPE] [key=value ...]        # RECIPE: a name in recipes/ or a YAML path
#   sbatch --nodes=4 --time=48:00:00 --account=A --partition=P slurm/pretrain.sh ps_131k train.max_steps=20000
#   SBATCH_ACCOUNT=A SBATCH_PARTITION=P SBATCH_TIMELIMIT=12:00:00 sbatch slurm/pretrain.sh ps_131k
#   sbatch --gpus-per-node=0 --nodes=2 slurm/pretrain.sh cpu_demo      # CPU nodes (CPU=1 forces it)
#
# Preemption: SLURM sends USR2 to this shell GRACE seconds before the time limit (--signal=B:USR2@GRACE,
# or `scancel --batch --signal=USR2 JOB`); the shell forwards it to the training processes, which agree
# at the next step boundary, save a checkpoint together, record the preemption (RUN/checkpoints/
# preempted.json) and exit 75. Only then does the shell requeue the job (`scontrol requeue`), deciding
# from that record rather than srun's exit code; the requeued run resumes from RUN/checkpoints/latest.
# Anything else is a real failure: the job fails once, with the error in this log, and is not requeued.
#
# Environment knobs: CPU=1 (force CPU mode), PROCS_PER_NODE (training processes per node; default: GPUs
# on the node, or 1 on CPU nodes), CADUCEUS_HOME (the checkout; default: the submit directory),
# CADUCEUS_PYTHON (default: CADUCEUS_HOME/.venv/bin/python if present, else python3), CADUCEUS_ENTRY
# (default: recipes/pretrain.py), MASTER_PORT, MAX_REQUEUES (default 50), FORWARD_EVERY (seconds
# between repeats of a forwarded signal while training has not exited; default 30).
#
#SBATCH --job-name=caduceus
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@300
#SBATCH --output=%x-%j.out

set -uo pipefail

log() { echo "[pretrain.sh $(date -u +%H:%M:%S)] $*"; }
die() { log "error: $*"; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch (it reads the SLURM allocation), e.g. sbatch slurm/pretrain.sh cpu_demo"

HOME_DIR=${CADUCEUS_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
ENTRY=${CADUCEUS_ENTRY:-$HOME_DIR/recipes/pretrain.py}
[ -f "$ENTRY" ] || die "$ENTRY not found: run sbatch from the caduceus-dist checkout or set CADUCEUS_HOME"
if [ -n "${CADUCEUS_PYTHON:-}" ]; then PYTHON=$CADUCEUS_PYTHON
elif [ -x "$HOME_DIR/.venv/bin/python" ]; then PYTHON=$HOME_DIR/.venv/bin/python
else PYTHON=python3; fi
export PYTHONPATH="$HOME_DIR${PYTHONPATH:+:$PYTHONPATH}"

RECIPE=${1:-ps_131k}
[ $# -gt 0 ] && shift
case $RECIPE in
  *=*) die "the first argument is the recipe (a name in recipes/ or a YAML path), got the override '$RECIPE'" ;;
  */*|*.yaml|*.yml) CONFIG=$RECIPE ;;
  *) CONFIG=$HOME_DIR/recipes/$RECIPE.yaml ;;
esac
[ -f "$CONFIG" ] || die "recipe $CONFIG not found (recipes: $(cd "$HOME_DIR/recipes" 2>/dev/null && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))"

# CPU mode: asked for, or no GPU in the allocation.
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ "${CPU:-0}" = 1 ] || [ "$GPUS" = 0 ]; then
  MODE=cpu
  PROCS=${PROCS_PER_NODE:-1}
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-1} / PROCS > 0 ? ${SLURM_CPUS_ON_NODE:-1} / PROCS : 1 ))}
else
  MODE=gpu
  PROCS=${PROCS_PER_NODE:-$GPUS}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
fi

# Rendezvous on the first node of the allocation (an address that works even where DNS does not know
# the node names; a port derived from the job id, so a requeued job finds the same one); the same rule
# as the Submitit launcher's (caduceus_dist/launch.py).
RENDEZVOUS=$("$PYTHON" -m caduceus_dist.launch rendezvous) || die "cannot derive the rendezvous address with $PYTHON (is caduceus-dist installed there? set CADUCEUS_PYTHON)"
eval "$RENDEZVOUS"
export MASTER_ADDR MASTER_PORT

RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_REQUEUES=${MAX_REQUEUES:-50}
log "job $SLURM_JOB_ID SLURM_RESTART_COUNT=$RESTARTS nodes=$SLURM_JOB_NODELIST ($SLURM_JOB_NUM_NODES) mode=$MODE procs/node=$PROCS master=$MASTER_ADDR:$MASTER_PORT"
log "recipe $CONFIG overrides: $*"
[ "$RESTARTS" -gt 0 ] && log "requeued run: training resumes from the run's checkpoints/latest"

# Forward through SLURM (every process of the job's steps, not this shell), rather than to srun, which
# may not have its own signal handlers yet when the signal comes early. Not before rank 0 has created
# READY_FILE (its handlers are in, so every node's launcher is past its start-up and ignores the signal
# until its trainer listens): a task that slurmstepd has just started still dies of the signal.
export CADUCEUS_READY_FILE="${TMPDIR:-/tmp}/caduceus-ready-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
rm -f "$CADUCEUS_READY_FILE"
trap 'rm -f "$CADUCEUS_READY_FILE"' EXIT
SIGNALLED=""
LAST_FORWARD=""
signal_training() {
  [ -e "$CADUCEUS_READY_FILE" ] || return 0
  scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null
  LAST_FORWARD=$SECONDS
}
forward() {
  SIGNALLED=$1
  log "received SIG$1: forwarding it to the training processes (they save a checkpoint together and exit 75)"
  signal_training "$1"
}
trap 'forward USR2' USR2
trap 'forward TERM' TERM

# Each node's launcher starts with the preemption signals ignored (inherited through exec, until the
# trainer installs its handlers), so a signal that lands while Python is still starting is not fatal.
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
  bash -c 'trap "" USR2 TERM; exec "$@"' node-launcher \
  "$PYTHON" -m caduceus_dist.launch torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$PROCS" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$ENTRY" --config "$CONFIG" "$@" &
STEP_PID=$!

# Wait in short sleeps so traps run promptly; send a signal that came before READY_FILE as soon as it
# exists, and repeat it in case it reached a rank before its handlers were in (it ignores it until then).
FORWARD_EVERY=${FORWARD_EVERY:-30}
while kill -0 "$STEP_PID" 2>/dev/null; do
  sleep 1 & wait $! 2>/dev/null
  if [ -n "$SIGNALLED" ] && { [ -z "$LAST_FORWARD" ] || [ $(( SECONDS - LAST_FORWARD )) -ge "$FORWARD_EVERY" ]; }; then
    signal_training "$SIGNALLED"
  fi
done
wait "$STEP_PID"
RC=$?

if [ "$RC" = 0 ]; then
  log "training finished"
  exit 0
fi

# Requeue on the run's own record, not on srun's code: on several nodes the first to exit 75 gets the
# others' tasks killed (--kill-on-bad-exit), and srun then reports their code. The record names this
# job attempt and the checkpoint `latest` named when the ranks agreed to stop (docs/resume.md §7).
VERDICT=$("$PYTHON" -m caduceus_dist.launch preempted --config "$CONFIG" "$@" 2>&1)
if [ $? != 0 ]; then
  log "training failed with exit code $RC${SIGNALLED:+ after SIG$SIGNALLED}: not a preemption ($VERDICT), so the job is not requeued (errors above)"
  exit "$RC"
fi
if [ "$RC" = 75 ]; then
  log "checkpoint saved (exit 75): $VERDICT"
else
  log "srun exited with $RC, but $VERDICT (a node that exited later was killed by srun)"
fi
if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
  log "the job was already requeued $RESTARTS times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; resubmit to resume"
  exit 75
fi
log "requeueing job $SLURM_JOB_ID; the next run resumes from latest"
if scontrol requeue "$SLURM_JOB_ID"; then
  exit 0
fi
log "SLURM refused the requeue (job cancelled or past its time limit?): resubmit the same command to resume from latest"
exit 75
