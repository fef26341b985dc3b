#!/usr/bin/env bash
# Start this host's Ray node for Siteplan: `ray-node.sh head`, `ray-node.sh worker HEAD_IP:6379` or
# `ray-node.sh driver HEAD_IP:6379`, each with optional extra `ray start` arguments.
# The one place a node's `ray start` line is written: deploy/ray-cluster*.yaml call it, the
# container images call it, and tests/workers/test_cluster_processes.py starts its nodes with it.
#
# What the node declares (workers/routing.py routes on it):
#   head        --num-cpus=0: runs the GCS and the drivers (siteplan serve), never a stage.
#   GPU worker  --num-gpus=N (N GPUs found by nvidia-smi, or SITEPLAN_NODE_GPUS): the
#               GPU-capable stages (faces, PatchMatch, rendering) land here.
#   CPU worker  siteplan_cpu=<CPUs> and one siteplan_batch slot: the CPU stages land here.
#   driver      --num-cpus=0 --num-gpus=0: a host that runs `siteplan serve` (or reprocess) and no
#               stage; a Ray driver needs a raylet of its own host (an API pod, a second API host).
# Token auth is always on: the token is read from RAY_AUTH_TOKEN or from the file
# RAY_AUTH_TOKEN_PATH (default /etc/siteplan/ray-token); without one the node is not started.
#
# Settings (environment): SITEPLAN_HOME (project checkout, default: this script's parent),
# SITEPLAN_RAY_TEMP (Ray's temp, plasma fallback and spill dir, default /srv/ray: local
# disk, not the shared data folder), SITEPLAN_NODE_IP (the private address to bind and announce),
# SITEPLAN_NODE_GPUS, SITEPLAN_NODE_CPUS, SITEPLAN_RAY_PORT (6379),
# SITEPLAN_NODE_BLOCK=1 (stay in the foreground: containers).
# No Ray Client server is started (port 10001): drivers join as `driver` nodes instead.
set -euo pipefail

role=${1:-}
case "$role" in
  head) shift ;;
  worker|driver)
    head_address=${2:-}
    if [ -z "$head_address" ]; then echo "ray-node.sh $role needs the head's HOST:PORT" >&2; exit 2; fi
    shift 2 ;;
  *) echo "usage: ray-node.sh head | ray-node.sh worker|driver HEAD_HOST:PORT" >&2; exit 2 ;;
esac

home=${SITEPLAN_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ray_bin=${SITEPLAN_RAY_BIN:-$home/.venv/bin/ray}
temp=${SITEPLAN_RAY_TEMP:-/srv/ray}

export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-/etc/siteplan/ray-token}
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    echo "no Ray auth token: set RAY_AUTH_TOKEN or put it in $RAY_AUTH_TOKEN_PATH" >&2
    exit 2
  fi
fi

gpus=${SITEPLAN_NODE_GPUS:-}
if [ -z "$gpus" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
fi
cpus=${SITEPLAN_NODE_CPUS:-$(nproc)}

mkdir -p "$temp/spill"
chmod 700 "$temp"
args=(start "--temp-dir=$temp" "--disable-usage-stats")
if [ -n "${SITEPLAN_NODE_IP:-}" ]; then args+=("--node-ip-address=$SITEPLAN_NODE_IP"); fi
if [ "${SITEPLAN_NODE_BLOCK:-0}" = 1 ]; then args+=(--block); fi

if [ "$role" = head ]; then
  # Spilled objects can hold personal data: they go under the node's own temp dir (wiped by
  # `ray stop` + the tmpfiles rule in docs/operations.md), never to /tmp.
  spill="{\"object_spilling_config\": \"{\\\"type\\\": \\\"filesystem\\\", \\\"params\\\": {\\\"directory_path\\\": \\\"$temp/spill\\\"}}\"}"
  args+=(--head "--port=${SITEPLAN_RAY_PORT:-6379}" --num-cpus=0
    "--dashboard-host=${SITEPLAN_NODE_IP:-127.0.0.1}" "--system-config=$spill")
elif [ "$role" = driver ]; then
  args+=("--address=$head_address" --num-cpus=0 --num-gpus=0)
elif [ "$gpus" -gt 0 ]; then
  args+=("--address=$head_address" "--num-cpus=$cpus" "--num-gpus=$gpus")
else
  args+=("--address=$head_address" "--num-cpus=$cpus"
    "--resources={\"siteplan_cpu\": $cpus, \"siteplan_batch\": 1}")
fi
exec "$ray_bin" "${args[@]}" "$@"
