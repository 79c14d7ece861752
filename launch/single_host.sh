#!/usr/bin/env bash
# Runs one pretraining job on this machine (all its GPUs/TPU chips, or the CPU), one process.
#
#   launch/single_host.sh [--dry_run] CONFIG WORKDIR [--config.key=value ...]
#   launch/single_host.sh configs/vitb16.py /data/runs/vitb16 --config.data.data_dir=/data/tfds
#
# WORKDIR: a directory, or a gs://BUCKET/PATH passed to the run unchanged.
# Pinned to GPUs: launch/multi_gpu.sh. Several hosts: launch/tpu_pod.sh (Cloud TPU VM pods) and
# launch/slurm.sbatch (SLURM GPU clusters); see "Launching on pods and clusters" in the README.
set -euo pipefail

prog=$(basename "$0")
usage() {
  awk 'NR > 1 { if (!/^#/ || /^#SBATCH/) exit; sub(/^# ?/, ""); print }' "$0"
}

die() {
  echo "$prog: $1" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option '$1' (allowed before CONFIG: --dry_run --help)" ;;
    *) break ;;
  esac
  shift
done
[ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR (e.g. configs/tiny.py /tmp/stop_tiny)'
config=$1
workdir=$2
shift 2
[ -f "${config%%:*}" ] || die "config file '${config%%:*}' does not exist"

# Let XLA take most of GPU memory up front (its default is 75%), and keep TF off the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cmd=(python -m stop_jax.main "--config=${config}" "--workdir=${workdir}" "$@")

if [ "$dry_run" = 1 ]; then
  printf 'XLA_PYTHON_CLIENT_MEM_FRACTION=%q TF_CPP_MIN_LOG_LEVEL=%q' \
    "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$TF_CPP_MIN_LOG_LEVEL"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
case "$workdir" in
  *://*) ;; # gs://... goes to the run as it is (orbax and tf.io.gfile write there)
  *) mkdir -p "$workdir" ;;
esac
exec "${cmd[@]}"
