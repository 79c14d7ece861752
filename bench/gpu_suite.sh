#!/usr/bin/env bash
# The accelerator rows of bench/README.md: attention-kernel agreement, then the train-step bench
# for ViT-B/16, ViT-L/16 and ViT-H/14 in bf16 (synthetic batches, one device).
#   bash bench/gpu_suite.sh [OUTDIR] [SET]     SET: all (default) | check | b16 | l16 | h14
# Each bench prints a human summary and one `RESULT {json}` line; OUTDIR collects the logs.
set -euo pipefail
out=${1:-bench_results}
set_name=${2:-all}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

run() {  # run NAME ARGS...: one bench, its log in OUTDIR/NAME.log
  local name=$1
  shift
  echo "== $name: python bench/train_step.py $*"
  python bench/train_step.py --xla_unrolled=false --steps=10 --warmup=3 --peak_size=8192 "$@" \
    2>&1 | grep -v '^I0000\|^W0000' | tee "$out/$name.log" | grep -v '^RESULT' || true
}

case $set_name in
  all | check) python bench/attention_check.py 2>&1 | tee "$out/attention_check.log" ;;
esac
common=(--config.model.dtype=bfloat16)
case $set_name in
  all | b16)
    run vitb16_einsum --config=configs/vitb16.py --batch=128 "${common[@]}" --config.model.attention=einsum
    run vitb16_cudnn --config=configs/vitb16.py --batch=128 "${common[@]}" --config.model.attention=cudnn
    ;;
esac
case $set_name in
  all | l16) run vitl16_cudnn --config=configs/vitl16.py --batch=128 "${common[@]}" --config.model.attention=cudnn ;;
esac
case $set_name in
  all | h14) run vith14_cudnn --config=configs/vith14.py --batch=64 "${common[@]}" --config.model.attention=cudnn ;;
esac
