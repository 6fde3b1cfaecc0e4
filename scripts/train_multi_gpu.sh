#!/usr/bin/env bash
# Train on all GPUs of this machine with Lightning's DDP (one process per GPU, Lightning's own launcher).
#   scripts/train_multi_gpu.sh configs/cifar10.yaml [more sagan fit arguments, e.g. --trainer.devices 4]
# data.batch_size is per GPU: the effective batch is batch_size x GPUs (see README, "Several GPUs").
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: scripts/train_multi_gpu.sh CONFIG.yaml [sagan fit arguments]}
shift
exec .venv/bin/sagan fit --config "$config" --config configs/trainer/ddp.yaml "$@"
