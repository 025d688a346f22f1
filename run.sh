#!/usr/bin/env bash
# Train GPT-2 (124M) on every local GPU: fetches missing FineWeb shards, then one process per GPU.
#   ./run.sh                          the Muon record (7000 steps, ~3.28 val loss), a record file in runs/;
#                                     without a GPU: the smoke preset on the CPU (2 layers, 60 steps, ~150 s of CPU time)
#   ./run.sh --optimizer adamw ...    any setting of train_gpt2.py as --field value
#   NGPU=4 ./run.sh                   use fewer GPUs (same math: accumulation makes up the difference); on CPU: processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 [MASTER_PORT=29500] ./run.sh    on node 0, and NODE_RANK=1 on node 1:
#                                     several nodes (torchrun's static rendezvous; node 0 writes the record)
set -euo pipefail
cd "$(dirname "$0")"
die() { echo "run.sh: $*" >&2; exit 2; }
[ -z "${NGPU:-}" ] || [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || die "NGPU=$NGPU: must be a positive number of processes per node"
nnodes=${NNODES:-1}
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: must be a positive number of nodes"
if [ "$nnodes" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$nnodes needs MASTER_ADDR, the address of node 0 (and NODE_RANK, MASTER_PORT)"
  [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$nnodes" ] ||
    die "NNODES=$nnodes needs NODE_RANK, this node's number: 0 .. $((nnodes - 1)) (got '${NODE_RANK:-}')"
  launch=(--nnodes "$nnodes" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
  launch=(--standalone)
fi
ngpu=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
preset=()
if [ "$ngpu" = 0 ]; then
  echo "run.sh: no CUDA GPU found: running the smoke preset on the CPU (2 layers, 60 steps)"
  preset=(--preset smoke)  # a --preset among the caller's settings comes later and wins
fi
nproc=${NGPU:-$ngpu}
[ "$nproc" = 0 ] && nproc=1
# downloads only what the settings need and is missing; on a shared file system, download once before starting nodes
python data/cached_fineweb10B.py ${preset[@]+"${preset[@]}"} "$@"
if [ "$nnodes" = 1 ] && [ "$nproc" = 1 ] && [ "$ngpu" = 0 ]; then
  exec python train_gpt2.py ${preset[@]+"${preset[@]}"} "$@"  # one CPU process: no process group
fi
exec python -m torch.distributed.run "${launch[@]}" --nproc_per_node="$nproc" train_gpt2.py ${preset[@]+"${preset[@]}"} "$@"
