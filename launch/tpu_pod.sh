#!/usr/bin/env bash
# Runs one pretraining job on every worker of a Cloud TPU VM slice (or of several slices), from
# your workstation, detached: the run goes on when your laptop sleeps.
#
#   launch/tpu_pod.sh [start] TARGET [--num_slices=N] [--env KEY=VALUE ...] [--run=RUN]
#       [--shared_fs] [--repo_dir=DIR] [--skip_setup] [--sync_s=300] [--grace_s=300] [--dry_run]
#       CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh status TARGET [--run=RUN] [--lines=20]   # alive or exit code, last lines
#   launch/tpu_pod.sh logs TARGET [--run=RUN] [--worker=0] [--node=0] [--lines=100] [--follow]
#   launch/tpu_pod.sh stop TARGET [--run=RUN] [--grace_s=300]  # SIGTERM: save, exit 75
#   launch/tpu_pod.sh create --queued_resource=QR --zone=ZONE --accelerator_type=v5p-128
#       --runtime_version=VERSION [--num_slices=N] [--spot] [--wait] [--project=P] [--dry_run]
# TARGET: --name=TPU_VM (gcloud compute tpus tpu-vm) or --queued_resource=QR (gcloud compute
#   tpus queued-resources, every node), plus --zone=ZONE [--project=PROJECT].
#
# start: ships this checkout's HEAD (git archive) to DIR (default: ~/stop_jax) on every worker,
# then launch/tpu_worker.sh there stops what holds the TPU, provisions Python 3.11 with uv and
# launch/requirements-tpu.lock (idempotent), and starts the run detached, one log per worker in
# ~/stop_jax_logs/RUN/ (RUN: WORKDIR's last path component), copied to WORKDIR/logs/ every
# --sync_s seconds and at exit; --grace_s: how long a stale run gets to save before SIGKILL.
# WORKDIR: gs://BUCKET/PATH (every worker writes its shards of each checkpoint there), or an
# absolute path on one host; --shared_fs for an NFS/Filestore mount at the same path everywhere.
# Multislice: --num_slices=N on a queued resource of N slices (`create --num_slices=N`) runs on
# every node and adds --config.mesh.dcn_data=N; the TPU runtime gives the workers their
# MEGASCALE_* settings. --env KEY=VALUE (repeatable) goes to the training process;
# --dry_run prints every command instead of running it. Bash 3.2 compatible (macOS).
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

whole_number() {
  [[ ${1#*=} =~ ^[0-9]+$ ]] || die "$1 is not allowed: a whole number"
  printf '%s' "${1#*=}"
}

subcommand=start
case "${1:-}" in
  start | status | logs | stop | create)
    subcommand=$1
    shift
    ;;
esac

name='' queued='' zone='' project='' repo_dir='stop_jax' setup=1 dry_run=0 num_slices=1
run_name='' shared_fs=0 lines='' follow=0 grace_s='' sync_s='' worker=0 node=0
accelerator_type='' runtime_version='' spot=0 wait_active=0 poll_s=30
env_vars=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --queued_resource=*) queued=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo_dir=*) repo_dir=${1#*=} ;;
    --run=*) run_name=${1#*=} ;;
    --num_slices=*) num_slices=$(whole_number "$1") ;;
    --env=* | --env)
      if [ "$1" = --env ]; then
        [ "$#" -ge 2 ] || die '--env needs KEY=VALUE'
        shift
        kv=$1
      else
        kv=${1#*=}
      fi
      [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not allowed: KEY=VALUE"
      env_vars+=("$kv")
      ;;
    --shared_fs) shared_fs=1 ;;
    --skip_setup) setup=0 ;;
    --lines=*) lines=$(whole_number "$1") ;;
    --follow) follow=1 ;;
    --grace_s=*) grace_s=$(whole_number "$1") ;;
    --sync_s=*) sync_s=$(whole_number "$1") ;;
    --worker=*) worker=$(whole_number "$1") ;;
    --node=*) node=$(whole_number "$1") ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --spot) spot=1 ;;
    --wait) wait_active=1 ;;
    --poll_s=*) poll_s=$(whole_number "$1") ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    --config.*) die "'$1' is a config override: put it after CONFIG WORKDIR" ;;
    -*) die "unknown option '$1' (see --help for the options of each subcommand)" ;;
    *) break ;;
  esac
  shift
done

if [ "$subcommand" = create ] && [ -z "$queued" ]; then
  die 'create needs --queued_resource=QR (the name of the queued resource to create)'
fi
if [ -n "$name" ] && [ -n "$queued" ]; then
  die 'give --name=TPU_VM or --queued_resource=QR, not both'
fi
[ -n "$name$queued" ] || die 'missing --name=NAME (a TPU VM: gcloud compute tpus tpu-vm list) or --queued_resource=QR'
[ -n "$zone" ] || die 'missing --zone=ZONE (e.g. us-central2-b)'
[ "$num_slices" -ge 1 ] || die "--num_slices=$num_slices is not allowed: 1 or more"
if [ "$num_slices" -gt 1 ] && [ -z "$queued" ]; then
  die "--num_slices=$num_slices needs --queued_resource=QR: multislice runs on a queued resource of $num_slices nodes (see: $prog create)"
fi
root=$(cd "$(dirname "$0")/.." && pwd)

gcloud_flags=("--zone=$zone")
if [ -n "$project" ]; then
  gcloud_flags+=("--project=$project")
fi
if [ -n "$queued" ]; then
  gcloud_tpu=(gcloud compute tpus queued-resources)
  target=$queued
  all_workers=(--node=all --worker=all)
  one_worker=("--node=$node" "--worker=$worker")
else
  gcloud_tpu=(gcloud compute tpus tpu-vm)
  target=$name
  all_workers=(--worker=all)
  one_worker=("--worker=$worker")
fi

# Runs the commands (each one line of shell), or prints them under --dry_run.
perform() {
  local step
  if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$@"
    return 0
  fi
  for step in "$@"; do
    echo "+ $step" >&2
    eval "$step"
  done
}

create() {
  [ -n "$accelerator_type" ] || die 'create needs --accelerator_type= (the shape of one slice, e.g. v5p-128 or v4-32)'
  [ -n "$runtime_version" ] ||
    die 'create needs --runtime_version= (the TPU VM image, e.g. tpu-ubuntu2204-base for v4; see the Cloud TPU "TPU VM images" page)'
  [ "$#" -eq 0 ] || die "create takes no CONFIG WORKDIR (got '$*')"
  local cmd=(gcloud compute tpus queued-resources create "$queued" "${gcloud_flags[@]}"
    "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version")
  if [ "$num_slices" -gt 1 ]; then
    cmd+=("--node-count=$num_slices" "--node-prefix=$queued")
  else
    cmd+=("--node-id=$queued")
  fi
  if [ "$spot" = 1 ]; then
    cmd+=(--spot)
  fi
  local describe=(gcloud compute tpus queued-resources describe "$queued" "${gcloud_flags[@]}"
    '--format=value(state.state)')
  perform "$(show "${cmd[@]}")"
  if [ "$wait_active" = 0 ]; then
    echo "# its state (ACTIVE when every slice is up): $(show "${describe[@]}")"
    return 0
  fi
  if [ "$dry_run" = 1 ]; then
    echo "# then every ${poll_s}s until ACTIVE: $(show "${describe[@]}")"
    return 0
  fi
  local state
  while true; do
    state=$("${describe[@]}")
    echo "$prog: queued resource $queued: $state" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $queued is $state: $(show gcloud compute tpus queued-resources describe "$queued" "${gcloud_flags[@]}")" ;;
    esac
    sleep "$poll_s"
  done
}

start() {
  [ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR (e.g. configs/vith14.py gs://my-bucket/runs/vith14)'
  local config=$1 workdir=$2
  shift 2
  [ -f "$root/${config%%:*}" ] || die "config file '${config%%:*}' does not exist under $root"
  case "$workdir" in
    gs://?*) ;;
    /*)
      if [ "$num_slices" -gt 1 ] && [ "$shared_fs" = 0 ]; then
        die "WORKDIR '$workdir' is on each worker's own disk, but $num_slices slices are several hosts that must share it: use gs://BUCKET/PATH (or --shared_fs for a mount every worker shares)"
      fi
      ;;
    *) die "WORKDIR '$workdir' is not allowed: gs://BUCKET/PATH, or an absolute path, the same on every worker" ;;
  esac
  local overrides=("$@") word
  if [ "$num_slices" -gt 1 ]; then
    for word in ${overrides[@]+"${overrides[@]}"}; do
      case "$word" in
        --config.mesh.dcn_data=*) die "'$word' with --num_slices=$num_slices: the launcher sets --config.mesh.dcn_data=$num_slices itself" ;;
      esac
    done
    overrides+=("--config.mesh.dcn_data=$num_slices")
  fi
  local worker_args=()
  if [ -n "$run_name" ]; then worker_args+=("--run=$run_name"); fi
  for word in ${env_vars[@]+"${env_vars[@]}"}; do worker_args+=("--env=$word"); done
  if [ "$shared_fs" = 1 ]; then worker_args+=(--shared_fs); fi
  if [ "$setup" = 0 ]; then worker_args+=(--skip_setup); fi
  if [ -n "$grace_s" ]; then worker_args+=("--grace_s=$grace_s"); fi
  if [ -n "$sync_s" ]; then worker_args+=("--sync_s=$sync_s"); fi
  worker_args+=(-- "$config" "$workdir" ${overrides[@]+"${overrides[@]}"})

  local archive="${TMPDIR:-/tmp}/stop_jax_src.tar.gz" remote_archive=stop_jax_src.tar.gz
  local remote steps=()
  remote="set -euo pipefail; $(show bash "$repo_dir/launch/tpu_worker.sh" start ${worker_args[@]+"${worker_args[@]}"})"
  if [ "$setup" = 1 ]; then
    remote="set -euo pipefail; mkdir -p $(quote "$repo_dir") && tar -xzf $remote_archive -C $(quote "$repo_dir") && ${remote#set -euo pipefail; }"
    steps+=("git -C $(quote "$root") archive --format=tar.gz -o $(quote "$archive") HEAD")
    steps+=("$(show "${gcloud_tpu[@]}" scp "$archive" "$target:$remote_archive" "${gcloud_flags[@]}" "${all_workers[@]}")")
  fi
  steps+=("$(show "${gcloud_tpu[@]}" ssh "$target" "${gcloud_flags[@]}" "${all_workers[@]}" "--command=$remote")")

  if [ "$dry_run" = 1 ]; then
    echo "# on every worker, launch/tpu_worker.sh start:"
    bash "$root/launch/tpu_worker.sh" start --dry_run ${worker_args[@]+"${worker_args[@]}"} | sed 's/^/#   /'
  elif [ "$setup" = 1 ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    echo "$prog: warning: uncommitted changes are not shipped (only HEAD is)" >&2
  fi
  perform "${steps[@]}"
  if [ "$dry_run" = 0 ]; then
    echo "$prog: started; follow it with: $prog status $(show "${target_flags[@]}")" >&2
  fi
}

# status, logs, stop: launch/tpu_worker.sh on the workers.
on_workers() {
  local sub=$1 worker_args=()
  shift
  [ "$#" -eq 0 ] || die "$sub takes no CONFIG WORKDIR (got '$*'); name the run with --run=RUN"
  if [ -n "$run_name" ]; then worker_args+=("--run=$run_name"); fi
  if [ -n "$lines" ]; then worker_args+=("--lines=$lines"); fi
  if [ -n "$grace_s" ] && [ "$sub" = stop ]; then worker_args+=("--grace_s=$grace_s"); fi
  local where=("${all_workers[@]}")
  if [ "$sub" = logs ]; then
    where=("${one_worker[@]}")
    if [ "$follow" = 1 ]; then worker_args+=(--follow); fi
  fi
  perform "$(show "${gcloud_tpu[@]}" ssh "$target" "${gcloud_flags[@]}" "${where[@]}" \
    "--command=$(show bash "$repo_dir/launch/tpu_worker.sh" "$sub" ${worker_args[@]+"${worker_args[@]}"})")"
}

target_flags=("--${queued:+queued_resource}${name:+name}=$target" "${gcloud_flags[@]}")
case "$subcommand" in
  start) start "$@" ;;
  create) create "$@" ;;
  *) on_workers "$subcommand" "$@" ;;
esac
