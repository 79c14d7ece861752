#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: runs on one Cloud TPU VM worker, in the repository copy
# that tpu_pod.sh shipped there (tpu_pod.sh calls it on every worker at once over gcloud ssh).
#
#   bash launch/tpu_worker.sh start [--run=RUN] [--env=KEY=VALUE ...] [--shared_fs]
#        [--skip_setup] [--sync_s=300] [--grace_s=300] [--dry_run] CONFIG WORKDIR [--config.k=v ...]
#   bash launch/tpu_worker.sh status [--run=RUN] [--lines=20]
#   bash launch/tpu_worker.sh logs [--run=RUN] [--lines=100] [--follow]
#   bash launch/tpu_worker.sh stop [--run=RUN] [--grace_s=300]
#
# start: (1) refuses a WORKDIR on this worker's own disk when the job spans several hosts (use
#   gs://..., or --shared_fs for an NFS/Filestore mount at the same path on every worker);
#   (2) stops what holds the TPU: runs this script started earlier and every process with
#   /dev/accel* or /dev/vfio/* open (`sudo lsof`): SIGTERM, then SIGKILL after --grace_s;
#   (3) unless --skip_setup, provisions Python 3.11 (stock TPU VM images ship 3.10): uv from the
#   package index (`python3 -m pip install --user uv`), `uv venv --python 3.11 .venv`, then
#   `uv pip install -r launch/requirements-tpu.lock -e .`, each step only when not yet done
#   (the install only when the lock file or setup.cfg changed);
#   (4) starts `python -m stop_jax.main ...` detached (setsid + nohup: it survives the ssh
#   session), with the --env variables, appending to ~/stop_jax_logs/RUN/worker-I.log
#   (slice-S-worker-I.log on multislice), and copies that log to WORKDIR/logs/ every --sync_s
#   seconds and when the run exits (`gcloud storage cp` for gs://, `cp` for a path).
# RUN defaults to WORKDIR's last path component (start) or the run last started here (others).
# stop sends SIGTERM: the run saves, exits with 75 (preempted) and `start` again resumes it.
set -euo pipefail

prog=tpu_worker.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
self="$here/$prog"
log_root=${STOP_JAX_LOG_ROOT:-$HOME/stop_jax_logs}
preempted_exit_code=75 # the run saved after SIGTERM and wants to be resumed (EX_TEMPFAIL)
metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes

usage() {
  awk 'NR > 1 { if (!/^#/ || /^#SBATCH/) exit; sub(/^# ?/, ""); print }' "$self"
}

die() {
  echo "$prog: $1" >&2
  exit 2
}

# Prints its arguments as one shell command line, quoting only what needs it.
show() {
  local sep='' word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      printf '%s%s' "$sep" "$word"
    else
      printf "%s'%s'" "$sep" "${word//\'/\'\\\'\'}"
    fi
    sep=' '
  done
  printf '\n'
}

# One attribute of this TPU VM from the GCE metadata server (where JAX's TPU detection looks).
metadata() {
  curl -sf -m 10 -H 'Metadata-Flavor: Google' "$metadata_url/$1" 2>/dev/null || true
}

# A MEGASCALE_* value: from the environment, else from the `tpu-env` metadata that the TPU
# runtime writes on multislice queued resources (lines like MEGASCALE_NUM_SLICES: '2').
tpu_env() {
  if [ -n "${!1:-}" ]; then
    echo "${!1}"
  else
    metadata tpu-env | sed -n "s/^$1: *'\{0,1\}\([^']*\)'\{0,1\} *\$/\1/p" | head -n 1
  fi
}

num_slices() {
  local slices
  slices=$(tpu_env MEGASCALE_NUM_SLICES)
  if [[ $slices =~ ^[0-9]+$ ]] && [ "$slices" -gt 1 ]; then echo "$slices"; else echo 1; fi
}

# This worker's log name: worker-I, or slice-S-worker-I when the job spans several slices.
worker_name() {
  local worker
  worker=$(metadata agent-worker-number)
  [[ $worker =~ ^[0-9]+$ ]] || worker="host-$(hostname)"
  if [ "$(num_slices)" -gt 1 ]; then
    echo "slice-$(tpu_env MEGASCALE_SLICE_ID)-worker-$worker"
  else
    echo "worker-$worker"
  fi
}

# Hosts in the whole job: this slice's workers (from the metadata) times the slices.
job_hosts() {
  local endpoints workers=1
  endpoints=$(metadata worker-network-endpoints)
  if [ -n "$endpoints" ]; then
    local commas=${endpoints//[!,]/}
    workers=$((${#commas} + 1))
  fi
  echo $((workers * $(num_slices)))
}

# PIDs of the processes with a TPU device open (v4/v5p: /dev/accel*, v5e/v6e: /dev/vfio/*, or
# the space-separated patterns of STOP_JAX_TPU_DEVICES).
tpu_holders() {
  local devices=() dev
  # shellcheck disable=SC2086  # the patterns are meant to be split and expanded.
  for dev in ${STOP_JAX_TPU_DEVICES:-/dev/accel* /dev/vfio/*}; do
    if [ -e "$dev" ]; then devices+=("$dev"); fi
  done
  [ "${#devices[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then
    sudo -n lsof -t -w "${devices[@]}" 2>/dev/null | sort -un || true
  else
    lsof -t -w "${devices[@]}" 2>/dev/null | sort -un || true
  fi
}

cmdline() {
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true
}

# Whether PID is running (a zombie has finished: only its parent's wait is missing).
running() {
  [ -n "$1" ] && ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'
}

# Whether PID is running and its command line contains WORD (a reused PID is not ours).
alive_as() {
  running "$1" && cmdline "$1" | grep -qF -- "$2"
}

signal() {
  kill "-$1" -- "$2" 2>/dev/null || sudo -n kill "-$1" -- "$2" 2>/dev/null || true
}

# SIGTERM to each PID (a run saves, then exits), SIGKILL to its process group after GRACE s.
terminate() {
  local grace=$1 pid waited=0 left
  shift
  for pid in "$@"; do
    echo "$prog: SIGTERM to pid $pid: $(cmdline "$pid")"
    signal TERM "$pid"
  done
  while [ "$waited" -lt $((grace * 5)) ]; do
    left=0
    for pid in "$@"; do
      if running "$pid"; then left=1; fi
    done
    [ "$left" = 1 ] || return 0
    sleep 0.2
    waited=$((waited + 1))
  done
  for pid in "$@"; do
    if running "$pid"; then
      echo "$prog: pid $pid still alive after ${grace}s: SIGKILL to its process group"
      signal KILL "-$pid"
      signal KILL "$pid"
    fi
  done
}

# Stops every run this script started here (any RUN) and every other process holding the TPU.
stop_stale() {
  if [ "$dry_run" = 1 ]; then
    echo "# stop what holds the TPU: earlier runs (~/stop_jax_logs/*/*.pid) and the holders of"
    echo "# sudo lsof -t -w /dev/accel* /dev/vfio/*: kill -TERM PID; kill -KILL -PID after ${grace_s}s"
    return 0
  fi
  local pids=() pid file sid
  for file in "$log_root"/*/*.pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    if alive_as "$pid" "$prog"; then pids+=("$pid"); fi
  done
  for pid in $(tpu_holders); do
    # A holder in the session of a run stopped above gets the SIGTERM from that run, once.
    sid=$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ') || sid=''
    case " ${pids[*]:-} " in
      *" $pid "* | *" $sid "*) ;;
      *) pids+=("$pid") ;;
    esac
  done
  terminate "$grace_s" ${pids[@]+"${pids[@]}"}
  # libtpu's lock file outlives a killed process and makes the next one refuse the TPU.
  if [ -e /tmp/libtpu_lockfile ] && [ -z "$(tpu_holders)" ]; then
    rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile || true
  fi
}

# Python 3.11 in .venv with the locked dependencies; does only what is missing.
provision() {
  local uv lock=launch/requirements-tpu.lock stamp
  if [ "$dry_run" = 1 ]; then
    echo "# Python >= 3.11 and the locked dependencies, each step only when not done yet (uv: ~/.local/bin/uv):"
    show python3 -m pip install --user --quiet uv
    show uv venv --python 3.11 .venv
    show uv pip install --quiet --python .venv/bin/python -r "$lock" -e .
    return 0
  fi
  [ -f "$lock" ] || die "missing $repo/$lock"
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  if ! [ -x "$uv" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      sudo -n apt-get -qq update && sudo -n apt-get -qq install -y python3-pip >/dev/null
    fi
    # --break-system-packages only where pip refuses a --user install (PEP 668 images).
    python3 -m pip install --user --quiet uv ||
      python3 -m pip install --user --quiet --break-system-packages uv
    uv="$HOME/.local/bin/uv"
  fi
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    rm -rf .venv # e.g. a venv of the image's Python 3.10 made by an older launcher
    "$uv" venv --python 3.11 .venv
  fi
  stamp=$(cat "$lock" setup.cfg | sha256sum | cut -d' ' -f1)
  if [ "$(cat .venv/.stop_jax_installed 2>/dev/null)" != "$stamp" ]; then
    "$uv" pip install --quiet --python .venv/bin/python -r "$lock" -e .
    echo "$stamp" >.venv/.stop_jax_installed
  fi
}

# Copies this worker's log to WORKDIR/logs/.
sync_log() {
  local dest="$workdir/logs/$name.log"
  case "$workdir" in
    gs://*) gcloud storage cp --quiet "$log" "$dest" >/dev/null 2>&1 || echo "$prog: could not copy $log to $dest" >&2 ;;
    *) mkdir -p "$workdir/logs" && cp "$log" "$dest" || true ;;
  esac
}

# The detached part: the training process, the log copies, and SIGTERM passed on to it once.
supervise() {
  local child='' syncer rc=0 what=finished stop_asked=0
  # SIGTERM only: nohup leaves SIGHUP ignored and bash ignores SIGINT in background jobs.
  trap 'stop_asked=1; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi' TERM
  "${main_argv[@]}" </dev/null &
  child=$!
  if [ "$stop_asked" = 1 ]; then kill -TERM "$child" 2>/dev/null || true; fi # asked at once
  (
    trap - TERM
    while sleep "$sync_s"; do sync_log; done
  ) &
  syncer=$!
  # A trapped signal ends `wait` early: wait until the run is gone, then take its exit code.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
  done
  if wait "$child"; then rc=0; else rc=$?; fi
  kill "$syncer" 2>/dev/null || true
  wait "$syncer" 2>/dev/null || true
  if [ "$rc" = "$preempted_exit_code" ]; then
    what="preempted: saved; 'launch/tpu_pod.sh start' with the same CONFIG WORKDIR resumes"
  elif [ "$rc" != 0 ]; then
    what=failed
  fi
  echo "=== $(date -u +%FT%TZ) $name: exit code $rc ($what)"
  echo "$rc" >"$run_dir/$name.exit"
  sync_log
  exit "$rc"
}

start() {
  local hosts pid
  case "$workdir" in
    gs://*) ;;
    /*)
      if [ "$shared_fs" = 0 ] && [ "$dry_run" = 0 ]; then
        hosts=$(job_hosts)
        if [ "$hosts" -gt 1 ]; then
          die "WORKDIR '$workdir' is on this worker's own disk, but the job spans $hosts hosts, each of which would write its own part of every checkpoint there: use a gs:// WORKDIR (or --shared_fs for a mount that every worker shares)"
        fi
      fi
      ;;
    *) die "WORKDIR '$workdir' is not allowed: gs://BUCKET/PATH or an absolute path" ;;
  esac
  stop_stale
  if [ "$skip_setup" = 0 ]; then
    provision
  elif [ "$dry_run" = 0 ] && ! [ -x .venv/bin/python ]; then
    die "--skip_setup, but there is no $repo/.venv: run once without --skip_setup"
  fi
  if [ "$dry_run" = 1 ]; then
    echo "# detached (setsid nohup), appending to $log; copied to $workdir/logs/$name.log every ${sync_s}s and at exit:"
    show setsid nohup "${main_argv[@]}"
    return 0
  fi
  mkdir -p "$run_dir"
  ln -sfn "$run_name" "$log_root/latest"
  rm -f "$run_dir/$name.exit"
  echo "=== $(date -u +%FT%TZ) $name on $(hostname): $(show "${main_argv[@]}")" >>"$log"
  # A session of its own: neither the end of the ssh session (SIGHUP) nor a ^C of gcloud
  # reaches it. Nothing left open on the ssh channel, so gcloud returns at once.
  setsid nohup bash "$self" _supervise "${argv[@]}" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$run_dir/$name.pid"
  sleep 2
  if ! alive_as "$pid" "$prog"; then
    echo "$name ($(hostname)): the run exited at once; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "$name ($(hostname)): started pid $pid, log $log"
}

status() {
  local pid
  pid=$(cat "$run_dir/$name.pid" 2>/dev/null) || pid=''
  if [ -z "$pid" ]; then
    echo "$name ($(hostname)): run '$run_name' was never started here"
    return 0
  elif alive_as "$pid" "$prog"; then
    echo "$name ($(hostname)): running, pid $pid, for $(ps -o etime= -p "$pid" | tr -d ' ')"
  elif [ -f "$run_dir/$name.exit" ]; then
    echo "$name ($(hostname)): exited with code $(cat "$run_dir/$name.exit")"
  else
    echo "$name ($(hostname)): not running (killed before it could write an exit code)"
  fi
  tail -n "$lines" "$log" 2>/dev/null | sed "s/^/  $name| /"
}

stop() {
  local pid
  pid=$(cat "$run_dir/$name.pid" 2>/dev/null) || pid=''
  if ! alive_as "$pid" "$prog"; then
    echo "$name ($(hostname)): run '$run_name' is not running"
    return 0
  fi
  terminate "$grace_s" "$pid"
  echo "$name ($(hostname)): stopped, exit code $(cat "$run_dir/$name.exit" 2>/dev/null || echo 'none (killed)')"
}

logs() {
  [ -f "$log" ] || die "no log $log on $(hostname)"
  if [ "$follow" = 1 ]; then
    exec tail -n "$lines" -F "$log"
  fi
  tail -n "$lines" "$log"
}

[ "$#" -ge 1 ] || die "missing a subcommand: start, status, logs or stop (see --help)"
command=$1
shift
case "$command" in
  start | status | logs | stop | _supervise) ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) die "unknown subcommand '$command' (allowed: start, status, logs, stop)" ;;
esac
argv=("$@")
run_name='' env_vars=() shared_fs=0 skip_setup=0 sync_s=300 grace_s=300 lines='' follow=0 dry_run=0
whole_number() {
  [[ ${1#*=} =~ ^[0-9]+$ ]] || die "$1 is not allowed: a whole number"
  echo "${1#*=}"
}
while [ "$#" -gt 0 ]; do
  case "$1" in
    --run=*) run_name=${1#*=} ;;
    --env=*)
      [[ ${1#*=} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='${1#*=}' is not allowed: KEY=VALUE"
      env_vars+=("${1#*=}")
      ;;
    --shared_fs) shared_fs=1 ;;
    --skip_setup) skip_setup=1 ;;
    --sync_s=*) sync_s=$(whole_number "$1") ;;
    --grace_s=*) grace_s=$(whole_number "$1") ;;
    --lines=*) lines=$(whole_number "$1") ;;
    --follow) follow=1 ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
  shift
done

if [ "$command" = start ] || [ "$command" = _supervise ]; then
  [ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR'
  config=$1 workdir=${2%/}
  shift 2
  main_argv=(env TF_CPP_MIN_LOG_LEVEL=2 ${env_vars[@]+"${env_vars[@]}"} .venv/bin/python -m stop_jax.main
    "--config=$config" "--workdir=$workdir" "$@")
  run_name=${run_name:-$(basename "$workdir")}
elif [ "$#" -gt 0 ]; then
  die "unexpected arguments '$*': $command takes only options"
elif [ -z "$run_name" ]; then
  run_name=$(readlink "$log_root/latest" 2>/dev/null) ||
    die "no run was started on this worker (no $log_root/latest): pass --run=RUN"
fi
[[ $run_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run='$run_name' is not allowed: letters, digits, '_', '.', '-'"
run_dir="$log_root/$run_name"
if [ "$dry_run" = 1 ]; then
  name='worker-I' # the worker number is read from the metadata on the worker
  log_root=${STOP_JAX_LOG_ROOT:-'~/stop_jax_logs'}
  run_dir="$log_root/$run_name"
else
  name=$(worker_name)
fi
log="$run_dir/$name.log"
cd "$repo"

case "$command" in
  start) start ;;
  _supervise) supervise ;;
  status)
    lines=${lines:-20}
    status
    ;;
  stop) stop ;;
  logs)
    lines=${lines:-100}
    logs
    ;;
esac
