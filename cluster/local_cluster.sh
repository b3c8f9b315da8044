#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, on loopback only (127.0.0.1): one head node and N
# worker nodes, each a separate raylet with its own resources. Use it to try placement
# strategies, custom resources and lost nodes without a cloud account.
#
#   cluster/local_cluster.sh start [N]    head + N worker nodes (default 2)
#   cluster/local_cluster.sh status       nodes and their resources
#   cluster/local_cluster.sh stop         stop exactly the cluster this script started
#
# Then, in another shell (`start` prints the exact line):
#   export RAY_ADDRESS=127.0.0.1:6390 RAY_AUTH_MODE=token   # ray_lit.fit connects to RAY_ADDRESS
#   python examples/minimal/train.py
#
# Resources per node (drivers run anywhere; ray_lit's worker actors go where you ask):
#   head      CPU=$HEAD_CPUS (1)    {"head": 1}
#   worker i  CPU=$WORKER_CPUS (1)  {"worker": 1, "worker_<i>": 1}
# so resources_per_worker={"CPU": 1, "worker": 1} keeps ray_lit workers off the head, and
# placement_strategy="STRICT_SPREAD" puts one on each worker node.
#
# Why not `ray start --head` + `ray start --address=...`: `ray start` rewrites
# --node-ip-address=127.0.0.1 to the machine's routable IP and binds every port on all
# interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that variable set to 0
# `ray start --address` refuses to add a node. So the nodes are started by one keeper process
# with Ray's own multi-node helper (ray.cluster_utils.Cluster), every node on 127.0.0.1 and
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. The keeper runs in its own process group; `stop` sends
# SIGTERM to that group only (never `ray stop`, which stops every Ray on the machine).
#
# Environment: PORT (6390), DASHBOARD_PORT (8265, when ray[default] is installed; 0 = none),
# HEAD_CPUS (1), WORKER_CPUS (1), OBJECT_STORE_MB (150), STATE_DIR (/tmp/ray_lit_local_cluster).
set -euo pipefail

ADDRESS_IP=127.0.0.1          # loopback only, on purpose: nothing listens beyond this machine
PORT="${PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-150}"
STATE_DIR="${STATE_DIR:-/tmp/ray_lit_local_cluster}"
PIDFILE="$STATE_DIR/keeper.pgid"
LOG="$STATE_DIR/keeper.log"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# With a token (~/.ray/auth_token or RAY_AUTH_TOKEN) the cluster requires it; a client given an
# explicit address (RAY_ADDRESS) only sends it with RAY_AUTH_MODE=token, so say so to every one.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] ||
    [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
  export RAY_AUTH_MODE=token
fi

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

group_alive() {  # a process of group $1 that still runs (zombies do not count)
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

write_keeper() {
  cat >"$STATE_DIR/keeper.py" <<'PY'
"""Start head + N worker nodes on 127.0.0.1; stop them on SIGTERM / SIGINT."""
import signal
import sys
import threading

from ray.cluster_utils import Cluster

port, workers, head_cpus, worker_cpus, store_mb, dashboard = map(int, sys.argv[1:7])
store = store_mb * 1024 * 1024
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
cluster = Cluster(initialize_head=True, head_node_args=dict(
    node_ip_address="127.0.0.1", gcs_server_port=port, num_cpus=head_cpus, num_gpus=0,
    resources={"head": 1}, object_store_memory=store, include_dashboard=None if dashboard else False,  # None: if ray[default] is installed
    dashboard_host="127.0.0.1", dashboard_port=dashboard or None))
try:
    for i in range(1, workers + 1):
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=worker_cpus, num_gpus=0,
                         resources={"worker": 1, f"worker_{i}": 1}, object_store_memory=store)
    print(f"READY {cluster.address}", flush=True)
    stop.wait()
finally:
    cluster.shutdown()
    print("STOPPED", flush=True)
PY
}

start() {
  local workers="${1:-2}"
  if [[ -s "$PIDFILE" ]] && group_alive "$(cat "$PIDFILE")"; then
    echo "local_cluster: already running (process group $(cat "$PIDFILE")); run '$0 stop'" >&2
    exit 1
  fi
  mkdir -p "$STATE_DIR"
  write_keeper
  setsid python "$STATE_DIR/keeper.py" "$PORT" "$workers" "$HEAD_CPUS" "$WORKER_CPUS" \
    "$OBJECT_STORE_MB" "$DASHBOARD_PORT" >"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PIDFILE"
  for _ in $(seq 1 240); do
    if grep -q '^READY' "$LOG"; then
      echo "local_cluster: head + $workers worker node(s) on $ADDRESS_IP (process group $!)"
      echo "  export RAY_ADDRESS=$ADDRESS_IP:$PORT${RAY_AUTH_MODE:+ RAY_AUTH_MODE=$RAY_AUTH_MODE}"
      [[ "$DASHBOARD_PORT" != 0 ]] && echo "  dashboard / ray job submit: http://$ADDRESS_IP:$DASHBOARD_PORT"
      return 0
    fi
    if ! group_alive "$(cat "$PIDFILE")"; then break; fi
    sleep 0.5
  done
  echo "local_cluster: the cluster did not come up; last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  stop
  exit 1
}

status() {
  python - "$ADDRESS_IP:$PORT" <<'PY'
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
for node in ray.nodes():
    public = {k: v for k, v in node["Resources"].items()
              if not k.startswith("node:") and "memory" not in k}
    print("alive" if node["Alive"] else "dead ", node["NodeManagerAddress"], public)
PY
}

stop() {
  if [[ ! -s "$PIDFILE" ]]; then
    echo "local_cluster: nothing to stop ($PIDFILE is missing)"
    return 0
  fi
  local pgid
  pgid="$(cat "$PIDFILE")"
  if group_alive "$pgid"; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 60); do group_alive "$pgid" || break; sleep 0.5; done
    if group_alive "$pgid"; then
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "local_cluster: process group $pgid did not stop within 30 s; killed it"
    fi
  fi
  rm -f "$PIDFILE"
  echo "local_cluster: stopped (process group $pgid)"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  -h|--help|help|"") usage 0 ;;
  *) usage 1 ;;
esac
