#!/bin/bash
# The perl corpus's small-batch sweep, as two halves in parallel (one thread each), then the whole
# grid once more (every run is found by id and reported, not redone) for one summary.
cd /work/wt-science
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 BATCHSIZE_STUDY_CACHE=/tmp/cache-science PYTHONPATH=/work/wt-science
P=/tmp/sci/perl
B="logger=csv trainer.enable_progress_bar=false"
PERL="data=text data.path=/usr/share/perl/5.36.0 data.glob=**/*.pm"
run() { name=$1; shift; /usr/bin/time -f "%e s wall" nice -n 5 python -m batchsize_study "$@" $B > /tmp/sci/log.$name 2>&1; echo "$name rc=$? $(date +%T) $(tail -1 /tmp/sci/log.$name)" >> /tmp/sci/progress; }
run perl_sweepA experiment=lr_sweep batch_size=16 'sweep.lrs=[0.00390625,0.015625]' study.dir=$P $PERL &
run perl_sweepB experiment=lr_sweep batch_size=16 'sweep.lrs=[0.0078125,0.001953125]' study.dir=$P $PERL &
wait
run perl_sweep experiment=lr_sweep batch_size=16 'sweep.lrs=[0.001953125,0.00390625,0.0078125,0.015625]' study.dir=$P $PERL
