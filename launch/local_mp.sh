#!/usr/bin/env bash
# Runs one job as N processes on this machine's CPU, the multi-process path of a pod in small:
# each process drives one CPU device, they meet through jax.distributed on a free local port,
# and their collectives go through gloo. The smoke test for multi-host code on a laptop.
#
#   launch/local_mp.sh [--num_processes=2] [--log_dir=DIR] [--grace_s=60] [--dry_run] \
#     CONFIG WORKDIR [--config.key=value ...]
#   launch/local_mp.sh configs/tiny.py:steps=3 /tmp/stop_mp --config.eval.probe=False
#
# Process I runs `python -m stop_jax.main --config=CONFIG --workdir=WORKDIR ...
# --coordinator_address=localhost:PORT --num_processes=N --process_id=I` with JAX_PLATFORMS=cpu
# (PORT: a free one, picked when the script starts) and writes DIR/process-I.log (DIR: default
# WORKDIR/logs; ./local_mp_logs for a gs:// WORKDIR). SIGTERM or ^C is passed on to every
# process (they save and exit with 75, preempted); when one process fails, the others get
# SIGTERM too, and SIGKILL --grace_s seconds later (they would wait for it forever). The exit
# code is the worst of theirs: a failure (the highest code other than 0 and 75), else 75, else
# 0. $PYTHON (default: python) runs them.
set -euo pipefail

prog=$(basename "$0")
preempted_exit_code=75 # a process saved after SIGTERM and wants to be resumed (EX_TEMPFAIL)
usage() {
  awk 'NR > 1 { if (!/^#/ || /^#SBATCH/) exit; sub(/^# ?/, ""); print }' "$0"
}

die() {
  echo "$prog: $1" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

whole_number() {
  [[ ${1#*=} =~ ^[0-9]+$ ]] || die "$1 is not allowed: a whole number"
  printf '%s' "${1#*=}"
}

num_processes=2 log_dir='' grace_s=60 dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --num_processes=*) num_processes=$(whole_number "$1") ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --grace_s=*) grace_s=$(whole_number "$1") ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option '$1' (allowed before CONFIG: --num_processes= --log_dir= --grace_s= --dry_run --help)" ;;
    *) break ;;
  esac
  shift
done
[ "$num_processes" -ge 1 ] || die "--num_processes=$num_processes is not allowed: 1 or more"
[ "$#" -ge 2 ] || die 'missing CONFIG WORKDIR (e.g. configs/tiny.py:steps=3 /tmp/stop_mp)'
config=$1
workdir=$2
shift 2
[ -f "${config%%:*}" ] || die "config file '${config%%:*}' does not exist"
case "$workdir" in
  *://*) log_dir=${log_dir:-local_mp_logs} ;;
  *) log_dir=${log_dir:-$workdir/logs} ;;
esac
python=${PYTHON:-python}

# A port nobody listens on now: the OS picks it for a socket bound to port 0.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

# Sets `argv` to the command of process $1.
process_argv() {
  argv=(env JAX_PLATFORMS=cpu "TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}" "$python" -m
    stop_jax.main "--config=$config" "--workdir=$workdir" ${overrides[@]+"${overrides[@]}"}
    "--coordinator_address=localhost:$port" "--num_processes=$num_processes" "--process_id=$1")
}
overrides=("$@")
if [ "$dry_run" = 1 ]; then
  printf 'mkdir -p %q\n' "$log_dir"
  for ((i = 0; i < num_processes; i++)); do
    process_argv "$i"
    printf '%q ' "${argv[@]}"
    printf '>%q 2>&1 &\n' "$log_dir/process-$i.log"
  done
  echo 'wait  # for all of them; SIGTERM goes on to each; the exit code is the worst'
  exit 0
fi

mkdir -p "$log_dir"
pids=() codes=()
stopping=0
# Passes SIGTERM on to every process still running.
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # called by the trap below.
on_signal() {
  echo "$prog: $1: passing SIGTERM on to every process" >&2
  stopping=1
  stop_all
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
for ((i = 0; i < num_processes; i++)); do
  process_argv "$i"
  "${argv[@]}" >"$log_dir/process-$i.log" 2>&1 </dev/null &
  pids+=("$!")
  codes+=('')
  echo "$prog: process $i of $num_processes: pid $!, log $log_dir/process-$i.log" >&2
done

failed_at=''
while true; do
  running=0
  for ((i = 0; i < num_processes; i++)); do
    [ -z "${codes[$i]}" ] || continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      running=1
      continue
    fi
    if wait "${pids[$i]}"; then codes[i]=0; else codes[i]=$?; fi
    echo "$prog: process $i exited with ${codes[$i]}" >&2
    if [ "${codes[$i]}" != 0 ] && [ "${codes[$i]}" != "$preempted_exit_code" ] && [ "$stopping" = 0 ]; then
      echo "$prog: process $i failed; the end of its log:" >&2
      tail -n 20 "$log_dir/process-$i.log" >&2
      echo "$prog: stopping the others (SIGTERM, SIGKILL after ${grace_s}s)" >&2
      stopping=1
      failed_at=$SECONDS
      stop_all
    fi
  done
  [ "$running" = 1 ] || break
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "$grace_s" ]; then
    for ((i = 0; i < num_processes; i++)); do
      if [ -z "${codes[$i]}" ]; then kill -KILL "${pids[$i]}" 2>/dev/null || true; fi
    done
  fi
  sleep 0.2
done

worst=0
for code in "${codes[@]}"; do
  if [ "$code" = "$preempted_exit_code" ]; then
    if [ "$worst" = 0 ]; then worst=$code; fi
  elif [ "$code" != 0 ]; then
    if [ "$worst" = "$preempted_exit_code" ] || [ "$code" -gt "$worst" ]; then worst=$code; fi
  fi
done
exit "$worst"
