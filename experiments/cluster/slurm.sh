#!/bin/bash
# One diffmem sweep in one SLURM allocation: a Ray cluster of the allocated nodes, one `trial_slot` each (so one
# training per node, on all its GPUs with --gpus-per-trial 8), then the sweep on it; the arguments go to
# sweeps/emm_search.py. The checkout (with its .venv, `make setup`) and --output must be on a file system every
# node mounts; submit from the checkout:
#
#   sbatch experiments/cluster/slurm.sh --config experiments/cifar10.yaml --gpus-per-trial 8 --factor width \
#       --output /shared/results/width --ledger /shared/results/ledger.sqlite
#   sbatch experiments/cluster/slurm.sh --resume /shared/results/width     # in a later allocation
#
# Five minutes before the time limit SLURM sends SIGTERM (--signal below): the sweep stops as after Ctrl-C and
# the --resume line continues it. Reads SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE, SLURM_CPUS_ON_NODE and
# SLURM_SUBMIT_DIR; DIFFMEM_PYTHON (default .venv/bin/python) and DIFFMEM_RAY_PORT (6379) may be set.
#SBATCH --job-name=diffmem-sweep
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=diffmem-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${DIFFMEM_PYTHON:-.venv/bin/python}
RAY="$(dirname "$PYTHON")/ray"
PORT=${DIFFMEM_RAY_PORT:-6379}
GPUS=${SLURM_GPUS_ON_NODE:-0}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "${NODES[0]}" hostname --ip-address | awk '{print $1}')
ADDRESS="$HEAD_IP:$PORT"
# Token authentication, one setting for every node and the driver: Ray 2.60's `ray start --head` turns it on
# where ~/.ray/auth_token exists, but worker nodes and a driver given an address only with RAY_AUTH_MODE=token.
# The token is read from the home folder each node mounts (made here, 256 random bits, if there is none).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  mkdir -p "$HOME/.ray"
  (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32), end='')" > "$HOME/.ray/auth_token")
fi

steps=()
stop_ray() {   # each node's `ray start --block` ends its Ray when its step ends
  kill "${steps[@]}" 2>/dev/null || true
  wait "${steps[@]}" 2>/dev/null || true
}
trap stop_ray EXIT

start_node() {   # start_node INDEX [ray start options]: one step on that node, blocking while its Ray runs
  local i=$1
  shift
  # the agent's port differs per node only so that several nodes can share one host (tests/test_multinode.py)
  srun --nodes=1 --ntasks=1 -w "${NODES[$i]}" "$RAY" start --block --num-cpus="$CPUS" --num-gpus="$GPUS" \
    --resources='{"trial_slot": 1}' --dashboard-agent-listen-port=$((52365 + i)) "$@" &
  steps+=($!)
}

wait_for_nodes() {   # wait_for_nodes N: until N nodes are alive in the cluster (at most 5 minutes)
  "$PYTHON" - "$ADDRESS" "$1" <<'EOF'
import sys, time
import ray
address, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300
while True:
    try:
        ray.init(address=address, log_to_driver=False)
        break
    except ConnectionError:
        if time.time() > deadline:
            sys.exit(f"no Ray head answers at {address} after 5 minutes")
        time.sleep(2)
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.time() > deadline:
        sys.exit(f"{alive} of {want} Ray nodes joined {address} in 5 minutes; see the step logs")
    time.sleep(2)
ray.shutdown()
EOF
}

start_node 0 --head --node-ip-address="$HEAD_IP" --port="$PORT"
wait_for_nodes 1
for ((i = 1; i < ${#NODES[@]}; i++)); do   # one node at a time, as Ray's own SLURM recipe staggers them: raylets
  start_node "$i" --address="$ADDRESS"     # registering at once can overload the head ("node timed out during
  wait_for_nodes $((i + 1))                # startup", Ray's fixed 30 s), seen with two nodes on 2 cores
done
echo "Ray cluster of ${#NODES[@]} nodes at $ADDRESS (${NODES[*]}), $GPUS GPUs and $CPUS CPUs each"

"$PYTHON" sweeps/emm_search.py --address "$ADDRESS" "$@" &
sweep=$!
trap 'kill -TERM $sweep' TERM   # SLURM's warning reaches the driver, which saves the sweep and stops
status=0
wait $sweep || status=$?
if [ "$status" -gt 128 ] && kill -0 $sweep 2>/dev/null; then   # wait was cut short by the signal: let it finish
  status=0
  wait $sweep || status=$?
fi
exit "$status"
