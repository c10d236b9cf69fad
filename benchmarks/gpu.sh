#!/usr/bin/env bash
# The GPU check, in one script:
#   1. tokens/s and MFU of the ~124M GPT-2 preset (model=gpt2_124m), small_batch and large_batch as
#      the study runs them, package vs bare loop (benchmarks/throughput.py), eager;
#   2. the wall time of the whole smoke study (superconvergence -> small_batch -> large_batch ->
#      compare) on the GPU;
#   3. the same throughput compiled (small_batch only: every side compiles once).
# Results go to $OUT (default benchmarks/results/gpu). Without a GPU (or with TINY=1) it runs the
# same parts smoke-sized on CPU, so the script itself can be checked anywhere:
#   bash benchmarks/gpu.sh            # GPU if there is one, else the tiny CPU run
#   TINY=1 bash benchmarks/gpu.sh     # force the tiny run
#
# A device is lent for minutes (one call of at most 10 minutes, its start-up counted against the
# session's 15), so the parts run inside one total budget (BUDGET seconds; 480 on a GPU), most
# valuable first, each capped at what is left. A part cut at its limit keeps what it printed and
# says so; a part with under a minute left is skipped and says so (both in $OUT/skipped.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export BATCHSIZE_STUDY_CACHE="${BATCHSIZE_STUDY_CACHE:-$OUT/cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package

has_gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "${TINY:-0}" == "1" || "$has_gpu" != "1" ]]; then
  echo "no GPU (or TINY=1): tiny CPU run of every part" | tee "$OUT/device.txt"
  MODEL=(debug=smoke micro_batch_size=auto)  # the GPU preset's auto micro batch, on CPU
  STEPS=(--steps 6 --warmup 2 --large-steps 3 --large-warmup 1)
  STUDY=(trainer.accelerator=cpu)
  BUDGET="${BUDGET:-900}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  # 124M parameters, seq 1024; the preset's micro_batch_size=auto finds the largest micro batch
  # that fits the card (each record says which, and the accumulation it implies).
  MODEL=(model=gpt2_124m)  # the preset carries its 50257-token vocabulary
  STEPS=(--steps 40 --warmup 10 --large-steps 16 --large-warmup 4)
  STUDY=(trainer.accelerator=gpu trainer.devices=1)
  BUDGET="${BUDGET:-480}"
fi
start=$SECONDS
rm -f "$OUT/skipped.txt"

# part NAME CAP CMD...: run CMD under min(CAP, what is left of the budget), or skip it when
# under a minute is left.
part() {
  local name=$1 cap=$2 left t rc
  shift 2
  left=$((BUDGET - (SECONDS - start)))
  t=$((left < cap ? left : cap))
  if ((t < 60)); then
    echo "--- $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/skipped.txt"
    return 0
  fi
  echo "--- $name (limit ${t}s) at $((SECONDS - start))s"
  timeout "$t" "$@"
  rc=$?
  if ((rc == 124)); then
    echo "--- $name cut at its limit (${t}s)" | tee -a "$OUT/skipped.txt"
  fi
  return 0
}

# 0. The corpus for this vocabulary (BPE trained once; the later parts reuse the cache).
part corpus 200 python -c "
import sys; sys.path.insert(0, 'benchmarks')
from _common import compose
from batchsize_study.data import prepare_corpus
c = compose(*sys.argv[1:]); prepare_corpus(c.data, c.model.seq_len)
" "${MODEL[@]}" 2>&1 | tail -n 2

# 1. Throughput and MFU, eager (the last lines: per-experiment tokens/s, MFU, ratio R).
part "eager throughput" 240 python benchmarks/throughput.py --rounds 2 "${STEPS[@]}" "${MODEL[@]}" \
  | tee "$OUT/throughput_eager.txt"

# 2. The whole smoke study on the device, timed (the study's arguments follow the script).
# shellcheck disable=SC2016
part "smoke study" 150 bash -c '
  out=$1; shift
  t0=$SECONDS
  python -m batchsize_study -m debug=smoke study.dir="$out/smoke_study" logger=csv \
    trainer.enable_progress_bar=false force=true "$@" \
    experiment=superconvergence,small_batch,large_batch 2>&1 | tail -n 3
  python -m batchsize_study debug=smoke study.dir="$out/smoke_study" logger=csv \
    experiment=compare 2>&1 | tail -n 2
  echo "smoke study wall time: $((SECONDS - t0))s" | tee "$out/smoke_study.txt"
  python benchmarks/gpu_records.py "$out/smoke_study" | tee -a "$out/smoke_study.txt"
' _ "$OUT" "${STUDY[@]}"

# 3. Compiled, small_batch only, one round: each side compiles once (nanoGPT's train.py: "takes a
#    ~minute" for GPT-2 124M), so this part gets whatever the budget has left.
part "compiled throughput" 600 python benchmarks/throughput.py --rounds 1 \
  --experiments small_batch "${STEPS[@]}" "${MODEL[@]}" compile=true \
  | tee "$OUT/throughput_compile.txt"

echo "total $((SECONDS - start))s of a ${BUDGET}s budget; results in $OUT"
grep -H "MFU\|^ratio" "$OUT"/throughput_*.txt 2>/dev/null
cat "$OUT/skipped.txt" 2>/dev/null
exit 0
