#!/usr/bin/env bash
# Creates .venv with caduceus-dist and its CPU torch. `--test` also installs the test tools and the
# Debian packages the SLURM tests start (slurm-wlm, munge; needs root and apt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[dev]"
  if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    else
      echo "note: slurm-wlm/munge not installed and not root: the SLURM tests will be skipped" >&2
    fi
  fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".$extras"
if [ -n "$extras" ] && [ ! -d "$VENV/transformers-4.46/transformers" ]; then
  # the oldest transformers the Hugging Face export supports, beside the venv's; tests/test_huggingface.py uses it
  "$VENV/bin/python" -m pip install -q --target "$VENV/transformers-4.46" "transformers==4.46.3"
fi
echo "caduceus-dist installed in $VENV"
