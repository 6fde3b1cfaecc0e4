#!/usr/bin/env bash
# Train on all GPUs of this machine with Lightning's DDP (one process per GPU, Lightning's own launcher).
#   scripts/train_multi_gpu.sh configs/cifar10.yaml [more sagan fit arguments, e.g. --trainer.devices 4]
# data.batch_size is per GPU: the effective batch is batch_size x GPUs (see README, "Several GPUs").
# Paths in the arguments (the config, data.root, output_root) are read from the folder you run it in, as with
# `sagan fit` itself; only the venv and configs/trainer/ddp.yaml are found beside this script.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
config=${1:?usage: scripts/train_multi_gpu.sh CONFIG.yaml [sagan fit arguments]}
shift
exec "$repo/.venv/bin/sagan" fit --config "$config" --config "$repo/configs/trainer/ddp.yaml" "$@"
