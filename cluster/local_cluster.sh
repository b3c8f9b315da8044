#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, on loopback only (127.0.0.1): one head node and N
# worker nodes, each a separate raylet with its own resources. Use it to try placement
# strategies, custom resources and node failures without a cloud account.
#
#   cluster/local_cluster.sh start [N]    head + N worker nodes (default 2)
#   cluster/local_cluster.sh status       nodes and resources
#   cluster/local_cluster.sh stop         stop exactly the nodes this script started
#
# Then, in another shell:
#   export RAY_ADDRESS=127.0.0.1:6390     # ray_lit.fit connects to RAY_ADDRESS
#   export RAY_AUTH_MODE=token            # when `start` says so (Ray's token authentication)
#   python examples/minimal/train.py
#
# Resources per node (the head runs drivers; workers run ray_lit's worker actors):
#   head      CPU=$HEAD_CPUS (1)    {"head": 1}
#   worker i  CPU=$WORKER_CPUS (1)  {"worker": 1, "worker_<i>": 1}
# so resources_per_worker={"CPU": 1, "worker": 1} keeps ray_lit workers off the head, and
# placement_strategy="STRICT_SPREAD" puts one on each worker node.
#
# Every node runs `ray start --block` in its own process group; `stop` sends SIGTERM to those
# process groups only (never `ray stop`, which would stop every Ray on the machine).
# Environment: PORT (6390), HEAD_CPUS (1), WORKER_CPUS (1), OBJECT_STORE_MB (200),
# STATE_DIR (/tmp/ray_lit_local_cluster).
set -euo pipefail

ADDRESS_IP=127.0.0.1          # loopback only, on purpose: nothing listens beyond this machine
PORT="${PORT:-6390}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
OBJECT_STORE_BYTES=$(( ${OBJECT_STORE_MB:-200} * 1024 * 1024 ))
STATE_DIR="${STATE_DIR:-/tmp/ray_lit_local_cluster}"
PIDS="$STATE_DIR/pids"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray enables token authentication on `ray start --head` when a token exists
# (~/.ray/auth_token or RAY_AUTH_TOKEN), but a client given an explicit address (worker nodes,
# RAY_ADDRESS) only sends it with RAY_AUTH_MODE=token: use one mode for every node and client.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] ||
    [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
  export RAY_AUTH_MODE=token
fi

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

wait_for_nodes() {  # wait until $1 nodes are alive
  local want=$1
  for _ in $(seq 1 30); do
    if python - "$want" <<PY 2>/dev/null
import sys, ray
ray.init(address="$ADDRESS_IP:$PORT", logging_level="ERROR", log_to_driver=False)
alive = sum(1 for n in ray.nodes() if n["Alive"])
sys.exit(0 if alive >= int(sys.argv[1]) else 1)
PY
    then return 0; fi
    sleep 1
  done
  echo "local_cluster: $want node(s) did not come up; see $STATE_DIR/*.log" >&2
  return 1
}

start_node() {  # name, then `ray start` arguments; records the node's process group id
  local name=$1; shift
  setsid ray start --block --node-ip-address="$ADDRESS_IP" \
    --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats "$@" \
    >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >>"$PIDS"
}

start() {
  local workers="${1:-2}"
  if [[ -s "$PIDS" ]]; then
    echo "local_cluster: already started (see $PIDS); run '$0 stop' first" >&2
    exit 1
  fi
  mkdir -p "$STATE_DIR"
  : >"$PIDS"
  trap 'echo "local_cluster: start failed; stopping what was started" >&2; stop' ERR
  start_node head --head --port="$PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    --resources='{"head": 1}' --dashboard-host="$ADDRESS_IP"
  wait_for_nodes 1
  for i in $(seq 1 "$workers"); do
    start_node "worker_$i" --address="$ADDRESS_IP:$PORT" --num-cpus="$WORKER_CPUS" \
      --num-gpus=0 --resources="{\"worker\": 1, \"worker_$i\": 1}"
  done
  wait_for_nodes $((workers + 1))
  trap - ERR
  echo "local_cluster: head + $workers worker node(s) at $ADDRESS_IP:$PORT"
  echo "  export RAY_ADDRESS=$ADDRESS_IP:$PORT${RAY_AUTH_MODE:+ RAY_AUTH_MODE=$RAY_AUTH_MODE}"
}

status() {
  python - <<PY
import ray
ray.init(address="$ADDRESS_IP:$PORT", logging_level="ERROR", log_to_driver=False)
for node in ray.nodes():
    public = {k: v for k, v in node["Resources"].items()
              if not k.startswith("node:") and "memory" not in k}
    print("alive" if node["Alive"] else "dead ", node["NodeManagerAddress"], public)
PY
}

group_alive() {  # a process of group $1 that is still running (zombies do not count)
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

stop() {
  if [[ ! -s "$PIDS" ]]; then
    echo "local_cluster: nothing to stop ($PIDS is empty or missing)"
    return 0
  fi
  # workers first, then the head (reverse start order)
  tac "$PIDS" | while read -r pgid name; do
    if group_alive "$pgid"; then
      kill -TERM -- "-$pgid" 2>/dev/null || true
      echo "local_cluster: stopping $name (process group $pgid)"
    fi
  done
  for _ in $(seq 1 20); do
    alive=0
    while read -r pgid _; do group_alive "$pgid" && alive=1; done <"$PIDS"
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  while read -r pgid name; do  # whatever ignored SIGTERM
    if group_alive "$pgid"; then
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "local_cluster: killed $name (process group $pgid)"
    fi
  done <"$PIDS"
  rm -f "$PIDS"
  echo "local_cluster: stopped"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  -h|--help|help|"") usage 0 ;;
  *) usage 1 ;;
esac
