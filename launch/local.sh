#!/usr/bin/env bash
# Run a job on one host (CPU or a single GPU/TPU host with all its local devices).
#   launch/local.sh configs/probe.py:model=llama2-7b runs/probe-7b [--config.x=y ...]
# Rerunning the same command resumes (results are written incrementally).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python main.py --config="$config" --workdir="$workdir" "$@"
