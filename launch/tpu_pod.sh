#!/usr/bin/env bash
# Runs one experiment on a Cloud TPU pod slice: the same command on every worker (one process
# per host; jax.distributed.initialize() finds the workers from the TPU metadata by itself).
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/runs/qwen3 \
#     launch/tpu_pod.sh --config=configs/sparse_to_dense/qwen3_math.py --config.mesh.shape='(1,-1,1)'
#
# WORKDIR must be one folder every worker shares (a GCS bucket mounted with gcsfuse at the same
# path, or NFS/Filestore): every process reads the markers process 0 writes and orbax writes
# each host's checkpoint shards there. Model folders (hf_dir) must be readable on every worker
# at the same path. REPO (default: this repository's origin) is cloned on every worker once;
# the install step runs every time (quick when nothing changed).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR to a shared folder}"
REPO="${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin)}"
BRANCH="${BRANCH:-$(git -C "$(dirname "$0")/.." rev-parse --abbrev-ref HEAD)}"
DIR="${DIR:-bridge}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
set -e
[ -d $DIR ] || git clone $REPO $DIR
cd $DIR && git fetch -q origin $BRANCH && git checkout -q $BRANCH && git reset -q --hard origin/$BRANCH
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install -q -U 'jax[tpu]' -e .
.venv/bin/python -m launch.train --workdir=$WORKDIR $ARGS
"
