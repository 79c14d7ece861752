#!/usr/bin/env bash
# Runs one pretraining job on this machine (all its GPUs/TPU chips, or the CPU).
#
#   launch/single_host.sh [--dry_run] CONFIG WORKDIR [--config.key=value ...]
#   launch/single_host.sh configs/vitb16.py /data/runs/vitb16 --config.data.data_dir=/data/tfds
#
# Multi-host TPU pods and SLURM clusters get their own scripts with the scale-out work.
set -euo pipefail

dry_run=0
if [ "${1:-}" = "--dry_run" ]; then
  dry_run=1
  shift
fi
if [ "$#" -lt 2 ]; then
  echo "usage: $0 [--dry_run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
if [ ! -f "${config%%:*}" ]; then
  echo "$0: config file '${config%%:*}' does not exist" >&2
  exit 2
fi

# Let XLA take most of GPU memory up front (its default is 75%), and keep TF off the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cmd=(python -m stop_jax.main "--config=${config}" "--workdir=${workdir}" "$@")

if [ "$dry_run" = 1 ]; then
  printf 'XLA_PYTHON_CLIENT_MEM_FRACTION=%s TF_CPP_MIN_LOG_LEVEL=%s' \
    "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$TF_CPP_MIN_LOG_LEVEL"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
mkdir -p "$workdir"
exec "${cmd[@]}"
