#!/usr/bin/env bash
# Train GPT-2 (124M) on every local GPU: fetches missing FineWeb shards, then one process per GPU.
#   ./run.sh                          the Muon record (7000 steps, ~3.28 val loss), a record file in records/
#   ./run.sh --optimizer adamw ...    any setting of train_gpt2.py as --field value
#   NGPU=4 ./run.sh                   use fewer GPUs (same math: accumulation makes up the difference)
set -euo pipefail
cd "$(dirname "$0")"
ngpu=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$ngpu" = 0 ]; then
  echo "run.sh: no CUDA GPU found. On CPU, run one process directly, for example:" >&2
  echo "  python train_gpt2.py --preset smoke" >&2
  echo "  torchrun --standalone --nproc_per_node=2 train_gpt2.py --preset smoke   (2 processes, gloo)" >&2
  exit 1
fi
python data/cached_fineweb10B.py "$@"  # downloads only what the settings need and is missing
exec torchrun --standalone --nproc_per_node="${NGPU:-$ngpu}" train_gpt2.py "$@"
