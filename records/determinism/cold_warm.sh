# Do --deterministic 1 runs depend on whether torch.compile's caches were cold or warm? Five short runs of one
# setting, one after another, each with its own view of Inductor's cache, then one table: the first train loss, the
# last one and params_sha256 per run (equal hashes: bit-identical parameters).
#
#   bash records/determinism/cold_warm.sh TRAIN_SHARD VAL_SHARD OUT [extra train_gpt2.py settings]
#   (PRESET=smoke: the smoke preset's model instead of the compare preset's)
#
#   cold-1  a new, empty cache folder C1          warm-1  C1 again (what cold-1 compiled and tuned)
#   cold-2  another new cache folder C2           warm-2  C2 again
#   nocache TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 (compiles everything, reads and writes no cache)
# (each cache folder also holds the Triton cache of the trainer's own kernels, TRITON_CACHE_DIR, so cold is cold)
# Then repeat_step.py (one step three times in one process) in a third new cache folder C3, cold, then twice warm:
# whether forward, backward and step repeat within a process, and its digests across the three processes.
# The generated code of each cache (Inductor's .py files and tuned configs) is kept in OUT/inductor-code-N.tgz:
# `diff -r` of two unpacked caches shows whether two compiles wrote different kernels.
set -u
train=$1 val=$2 out=$3
shift 3
extra=("$@")
preset=${PRESET:-compare}
mkdir -p "$out"
c1=$(mktemp -d) c2=$(mktemp -d)
run() {  # label, then env assignments
  local label=$1
  shift
  env "$@" python train_gpt2.py --preset "$preset" --input_bin "$train" --input_val_bin "$val" --num_iterations 12 \
    --warmup_iters 2 --warmdown_iters 2 --val_loss_every 0 --final_checkpoint 0 --matmul_check 0 --deterministic 1 \
    --records_dir "$out" --label "det-$label" "${extra[@]}" > "$out/$label.log" 2>&1
}
run cold-1 TORCHINDUCTOR_CACHE_DIR="$c1" TRITON_CACHE_DIR="$c1/triton-user"
run warm-1 TORCHINDUCTOR_CACHE_DIR="$c1" TRITON_CACHE_DIR="$c1/triton-user"
run cold-2 TORCHINDUCTOR_CACHE_DIR="$c2" TRITON_CACHE_DIR="$c2/triton-user"
run warm-2 TORCHINDUCTOR_CACHE_DIR="$c2" TRITON_CACHE_DIR="$c2/triton-user"
run nocache TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TRITON_CACHE_DIR="$(mktemp -d)"
c3=$(mktemp -d)
for label in cold-3 warm-3 warm-3b; do
  TORCHINDUCTOR_CACHE_DIR="$c3" TRITON_CACHE_DIR="$c3/triton-user" python records/determinism/repeat_step.py --repeats 3 --preset "$preset" \
    --input_bin "$train" --input_val_bin "$val" --matmul_check 0 --deterministic 1 "${extra[@]}" \
    > "$out/repeat_step-$label.log" 2>&1
done
printf "%-8s %-12s %-12s %s\n" run "loss step 1" "loss step 12" params_sha256
for label in cold-1 warm-1 cold-2 warm-2 nocache; do
  rec=$(grep -l "\"label\": \"det-$label\"" "$out"/*.txt 2>/dev/null | head -1)
  [ -z "$rec" ] && { echo "$label: no record (see $out/$label.log)"; continue; }
  first=$(grep -m1 -oE '^step:1/12 train_loss:[0-9.]+' "$rec" | cut -d: -f3)
  last=$(grep -m1 -oE '^step:12/12 train_loss:[0-9.]+' "$rec" | cut -d: -f3)
  printf "%-8s %-12s %-12s %s\n" "$label" "$first" "$last" "$(grep -oE '^params_sha256: [0-9a-f]+' "$rec" | cut -c16-31)"
done
for label in cold-3 warm-3 warm-3b; do
  echo "repeat_step $label: $(grep -cE '^repeat .*identical$' "$out/repeat_step-$label.log") of 6 stage checks" \
    "identical; $(grep -E '^loss' "$out/repeat_step-$label.log")"
  grep -E "^repeat .* differ" "$out/repeat_step-$label.log"
done
i=0
for c in "$c1" "$c2" "$c3"; do
  i=$((i + 1))
  (cd "$c" && find . \( -name '*.py' -o -name '*.best_config' \) -print0 | tar --null -czf "$out/inductor-code-$i.tgz" -T -)
done
rm -rf "$c1" "$c2" "$c3"
