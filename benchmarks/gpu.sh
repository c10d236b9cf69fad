#!/usr/bin/env bash
# The GPU check, in one script (each part under its own time limit):
#   1. tokens/s and MFU of the ~124M GPT-2 preset (model=gpt2_124m), small_batch and large_batch as
#      the study runs them, package vs bare loop (benchmarks/throughput.py): eager, then compiled;
#   2. the wall time of the whole smoke study (superconvergence -> small_batch -> large_batch ->
#      compare) on the GPU.
# Results go to $OUT (default benchmarks/results/gpu). Without a GPU (or with TINY=1) it runs the
# same parts smoke-sized on CPU, so the script itself can be checked anywhere:
#   bash benchmarks/gpu.sh            # GPU if there is one, else the tiny CPU run
#   TINY=1 bash benchmarks/gpu.sh     # force the tiny run
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
  MODEL=(debug=smoke)
  STEPS=(--steps 6 --warmup 2 --large-steps 3 --large-warmup 1)
  STUDY=(trainer.accelerator=cpu)
  LIMIT=900
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  # 124M parameters, seq 1024, micro batch 16 (small_batch 16 x 1; large_batch 16 x 4).
  MODEL=(model=gpt2_124m data.tokenizer.vocab_size=50257)
  STEPS=(--steps 40 --warmup 10 --large-steps 16 --large-warmup 4)
  STUDY=(trainer.accelerator=gpu trainer.devices=1)
  LIMIT=420
fi
start=$SECONDS

# 0. The corpus for this vocabulary (BPE trained once; the later parts reuse the cache).
timeout 300 python -c "
import sys; sys.path.insert(0, 'benchmarks')
from _common import compose
from batchsize_study.data import prepare_corpus
c = compose(*sys.argv[1:]); prepare_corpus(c.data, c.model.seq_len)
" "${MODEL[@]}" 2>&1 | tail -n 2
echo "corpus ready after $((SECONDS - start))s"

# 1. Throughput and MFU (the last lines of each file: per-experiment tokens/s, MFU, ratio R).
timeout "$LIMIT" python benchmarks/throughput.py --rounds 2 "${STEPS[@]}" "${MODEL[@]}" \
  | tee "$OUT/throughput_eager.txt"
echo "--- eager done after $((SECONDS - start))s"
# One round: every side compiles once (nanoGPT's train.py: "takes a ~minute" for GPT-2 124M).
timeout $((LIMIT + 180)) python benchmarks/throughput.py --rounds 1 "${STEPS[@]}" "${MODEL[@]}" compile=true \
  | tee "$OUT/throughput_compile.txt"
echo "--- compiled done after $((SECONDS - start))s"

# 2. The whole smoke study on the device, timed.
t0=$SECONDS
timeout "$LIMIT" python -m batchsize_study -m debug=smoke study.dir="$OUT/smoke_study" logger=csv \
  trainer.enable_progress_bar=false force=true "${STUDY[@]}" \
  experiment=superconvergence,small_batch,large_batch 2>&1 | tail -n 3
timeout 120 python -m batchsize_study debug=smoke study.dir="$OUT/smoke_study" logger=csv \
  experiment=compare 2>&1 | tail -n 2
echo "smoke study wall time: $((SECONDS - t0))s" | tee "$OUT/smoke_study.txt"
python - "$OUT/smoke_study" <<'EOF' | tee -a "$OUT/smoke_study.txt"
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*/result.json")):
    r = json.loads(p.read_text())
    print(f"{r['experiment']:18s} {r['status']:14s} steps {r['steps_done']:4d} "
          f"wall {r.get('wall_seconds') or 0:6.1f}s tok/s {r.get('tokens_per_second') or 0:,.0f} "
          f"mfu {r.get('mfu') or 0:.3%} precision {r.get('precision')}")
EOF
echo "total $((SECONDS - start))s; results in $OUT"
