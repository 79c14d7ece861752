#!/usr/bin/env bash
# Runs one pretraining job on the GPUs of this machine: one process drives them all.
#
#   launch/multi_gpu.sh [--gpus=0,1,2,3] [--dry_run] CONFIG WORKDIR [--config.key=value ...]
#   launch/multi_gpu.sh configs/vitb16.py /data/runs/vitb16 --config.data.data_dir=/data/tfds
#
# The device mesh spans every visible GPU (or those of --gpus, via CUDA_VISIBLE_DEVICES) and
# XLA moves the data between them over NVLink/PCIe with NCCL; no jax.distributed start-up is
# needed for one process. JAX_PLATFORMS=cuda makes a missing GPU an error instead of a silent
# CPU run. WORKDIR: a directory, or a gs://BUCKET/PATH passed to the run unchanged. Several
# nodes: launch/slurm.sbatch.
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

gpus='' dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --gpus=*) gpus=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option '$1' (allowed before CONFIG: --gpus= --dry_run --help)" ;;
    *) break ;;
  esac
  shift
done
if [ -n "$gpus" ] && ! [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus='$gpus' is not allowed: comma-separated GPU indices, e.g. --gpus=0,1,2,3"
fi
[ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR (e.g. configs/vitb16.py /data/runs/vitb16)'
config=$1
workdir=$2
shift 2
[ -f "${config%%:*}" ] || die "config file '${config%%:*}' does not exist"

env_vars=(
  JAX_PLATFORMS=cuda
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  "TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}"
)
if [ -n "$gpus" ]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
fi
cmd=(env "${env_vars[@]}" python -m stop_jax.main "--config=$config" "--workdir=$workdir" "$@")

if [ "$dry_run" = 1 ]; then
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  printf '\n'
  exit 0
fi
command -v nvidia-smi >/dev/null || die 'no NVIDIA driver here (nvidia-smi not found); on a CPU use launch/single_host.sh'
echo "$prog: $(nvidia-smi -L | wc -l) GPUs on this machine${gpus:+, using $gpus}" >&2
case "$workdir" in
  *://*) ;; # gs://... goes to the run as it is (orbax and tf.io.gfile write there)
  *) mkdir -p "$workdir" ;;
esac
exec "${cmd[@]}"
