#!/usr/bin/env bash
# The GPU check, in one script (about 5-8 minutes on one H200; each part has its own time limit):
#   1. tokens/s and MFU of the ~124M GPT-2 preset: package vs bare loop (benchmarks/throughput.py),
#      eager and torch.compile;
#   2. a small scale table (tokens/s, peak memory) around the 124M preset;
#   3. the whole smoke study (superconvergence -> small_batch -> large_batch -> compare) on the GPU.
# Results go to $OUT (default benchmarks/results/gpu). Without a GPU it runs a tiny CPU version of
# every part (same scripts, a smoke-sized model), so the script itself can be checked anywhere:
#   bash benchmarks/gpu.sh            # GPU if there is one, else the tiny CPU run
#   TINY=1 bash benchmarks/gpu.sh     # force the tiny run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export BATCHSIZE_STUDY_CACHE="${BATCHSIZE_STUDY_CACHE:-$OUT/cache}"
# The worktree's package, not an installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has_gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "${TINY:-0}" == "1" || "$has_gpu" != "1" ]]; then
  echo "no GPU (or TINY=1): tiny CPU run of every part"
  MODEL=(debug=smoke)
  ROUNDS=(--rounds 1 --steps 3 --warmup 2)
  SCALE=(--sizes 32x2x2 --seq-lens 32 --steps 2 --warmup 1 debug=smoke)
  STUDY=(trainer.accelerator=cpu)
  LIMIT=600
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  MODEL=(model=gpt2_124m data.tokenizer.vocab_size=50257 batch_size=32 micro_batch_size=32)
  ROUNDS=(--rounds 2 --steps 30 --warmup 10)
  SCALE=(--sizes 768x12x12 --seq-lens 1024 --steps 10 --warmup 3 model=gpt2_124m data.tokenizer.vocab_size=50257 batch_size=16 micro_batch_size=16)
  STUDY=(trainer.accelerator=gpu trainer.devices=1)
  LIMIT=240
fi
start=$SECONDS

# 0. The 50k-vocabulary corpus (BPE trained on the stdlib once; later parts reuse the cache).
timeout 180 python -c "
import sys; sys.path.insert(0, 'benchmarks')
from _common import compose
from batchsize_study.data import prepare_corpus
c = compose(*sys.argv[1:]); prepare_corpus(c.data, c.model.seq_len)
" "${MODEL[@]}" 2>&1 | tail -n 2
echo "corpus ready after $((SECONDS - start))s"

# 1. Throughput and MFU: eager, then compiled.
timeout "$LIMIT" python benchmarks/throughput.py "${ROUNDS[@]}" "${MODEL[@]}" 2>/dev/null \
  | tee "$OUT/throughput_eager.txt"
echo "--- after $((SECONDS - start))s"
# One round: each round compiles twice (package and bare), about a minute each on a GPU.
timeout "$LIMIT" python benchmarks/throughput.py "${ROUNDS[@]}" --rounds 1 "${MODEL[@]}" compile=true 2>/dev/null \
  | tee "$OUT/throughput_compile.txt"
echo "--- after $((SECONDS - start))s"

# 2. Scale table around the preset.
timeout "$LIMIT" python benchmarks/scale.py "${SCALE[@]}" 2>/dev/null | tee "$OUT/scale.md"
echo "--- after $((SECONDS - start))s"

# 3. The whole smoke study on the device (compare needs batchsize_study.report; tolerated if absent).
timeout "$LIMIT" python -m batchsize_study -m debug=smoke study.dir="$OUT/smoke_study" logger=csv \
  trainer.enable_progress_bar=false "${STUDY[@]}" \
  experiment=superconvergence,small_batch,large_batch 2>&1 | tail -n 5 | tee "$OUT/smoke_study.txt"
timeout 60 python -m batchsize_study debug=smoke study.dir="$OUT/smoke_study" logger=csv \
  experiment=compare 2>&1 | tail -n 3 | tee -a "$OUT/smoke_study.txt"
python - "$OUT/smoke_study" <<'EOF' | tee -a "$OUT/smoke_study.txt"
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*/result.json")):
    r = json.loads(p.read_text())
    print(f"{r['experiment']:18s} {r['status']:14s} steps {r['steps_done']:4d} "
          f"tok/s {r.get('tokens_per_second') or 0:,.0f} mfu {r.get('mfu') or 0:.3%} "
          f"precision {r.get('precision')}")
EOF
echo "total $((SECONDS - start))s; results in $OUT"
