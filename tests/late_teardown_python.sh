#!/usr/bin/env bash
# The python of slurm/pretrain.sh for tests/test_slurm_jobs.py: on node LATE_NODE (default 1) of a job's
# first attempt, the node's launcher ends LATE_SECONDS (default 60) after its trainers exited. This is the
# straggler of a multi-node preemption: the other node exits 75 first, and srun kills this one.
"$REAL_PYTHON" "$@"
code=$?
if [ "${1:-} ${2:-} ${3:-}" = "-m caduceus_dist.launch torchrun" ] && [ "${SLURM_NODEID:-}" = "${LATE_NODE:-1}" ] \
   && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  # one process that srun's kill ends (a shell waiting on `sleep` could still exit with the trainer's code)
  exec "$REAL_PYTHON" -c 'import sys, time; time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))' \
    "${LATE_SECONDS:-60}" "$code"
fi
exit $code
