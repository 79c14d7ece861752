#!/usr/bin/env bash
# Runs one pretraining job on every worker of a Cloud TPU VM pod slice, from your workstation.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--project=PROJECT] [--repo_dir=DIR]
#                     [--skip_setup] [--dry_run] CONFIG WORKDIR [--config.key=value ...]
#
# 1. ships this checkout's HEAD (git archive) to /tmp on every worker,
# 2. on every worker: unpacks it into DIR (default: stop_jax, in the remote home), creates
#    DIR/.venv if missing, pip installs the repo with jax[tpu],
# 3. runs `python -m stop_jax.main --config=CONFIG --workdir=WORKDIR ...` on all workers at once
#    (gcloud ... ssh --worker=all); the workers find each other through JAX's TPU detection.
#
# WORKDIR must be the same shared directory on every worker (e.g. a Filestore/NFS mount): all
# workers write their shards of each checkpoint there. --skip_setup skips steps 1-2 (code and
# venv already in place). Bash 3.2 compatible: runs from a macOS laptop too.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "$(basename "$0"): $1" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

# Quotes one word for a POSIX shell only when needed, so printed commands stay readable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one shell command line.
show() {
  local sep="" word
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=' '
  done
  printf '\n'
}

name='' zone='' project='' repo_dir='stop_jax' setup=1 dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo_dir=*) repo_dir=${1#*=} ;;
    --skip_setup) setup=0 ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --) shift; break ;;
    --config.*) die "'$1' is a config override: put it after CONFIG WORKDIR" ;;
    -*) die "unknown option '$1' (allowed: --name= --zone= --project= --repo_dir= --skip_setup --dry_run --help)" ;;
    *) break ;;
  esac
  shift
done

[ -n "$name" ] || die 'missing --name=NAME (the TPU VM name, see: gcloud compute tpus tpu-vm list)'
[ -n "$zone" ] || die 'missing --zone=ZONE (e.g. us-central2-b)'
[ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR (e.g. configs/vith14.py /mnt/shared/runs/vith14)'
config=$1
workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$root/${config%%:*}" ] || die "config file '${config%%:*}' does not exist under $root"
case "$workdir" in
  /*) ;;
  *) die "WORKDIR '$workdir' must be an absolute path, the same on every worker" ;;
esac

gcloud_flags=("--zone=$zone" --worker=all)
if [ -n "$project" ]; then
  gcloud_flags+=("--project=$project")
fi
archive=/tmp/stop_jax_src.tar.gz

main_cmd=$(show env TF_CPP_MIN_LOG_LEVEL=2 python -m stop_jax.main "--config=$config" \
  "--workdir=$workdir" "$@")
remote="set -euo pipefail; cd $(quote "$repo_dir") && . .venv/bin/activate && $main_cmd"
if [ "$setup" = 1 ]; then
  remote="set -euo pipefail; mkdir -p $(quote "$repo_dir") && tar -xzf $archive -C $(quote "$repo_dir")"
  remote+=" && cd $(quote "$repo_dir") && { [ -d .venv ] || python3 -m venv .venv; }"
  remote+=" && . .venv/bin/activate && pip install -q -e . 'jax[tpu]' && $main_cmd"
fi

steps=()
if [ "$setup" = 1 ]; then
  steps+=("git -C $(quote "$root") archive --format=tar.gz -o $archive HEAD")
  steps+=("$(show gcloud compute tpus tpu-vm scp "$archive" "$name:$archive" "${gcloud_flags[@]}")")
fi
steps+=("$(show gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" "--command=$remote")")

if [ "$dry_run" = 1 ]; then
  printf '# on every worker: %s\n' "$remote"
  printf '%s\n' "${steps[@]}"
  exit 0
fi
if [ "$setup" = 1 ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  echo "$(basename "$0"): warning: uncommitted changes are not shipped (only HEAD is)" >&2
fi
for step in "${steps[@]}"; do
  echo "+ $step" >&2
  eval "$step"
done
