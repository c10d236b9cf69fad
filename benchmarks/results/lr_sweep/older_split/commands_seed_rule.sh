#!/bin/bash
# The default study with the final superconvergence config: x, then the seed rule's y and z runs.
cd /work/wt-science
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 BATCHSIZE_STUDY_CACHE=/tmp/cache-science PYTHONPATH=/work/wt-science
S=/tmp/sci/default
B="logger=csv trainer.enable_progress_bar=false"
run() { name=$1; shift; /usr/bin/time -f "%e s wall" nice -n 5 python -m batchsize_study "$@" $B > /tmp/sci/log.$name 2>&1; echo "$name rc=$? $(date +%T) $(tail -1 /tmp/sci/log.$name)" >> /tmp/sci/progress; }
run sc_plateau experiment=superconvergence study.dir=$S
run small_batch_p experiment=small_batch study.dir=$S
run large_batch_p experiment=large_batch study.dir=$S
