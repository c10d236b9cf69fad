#!/bin/bash
# Measurements, sequential and niced; each step logs to /tmp/sci/log.<name>, one line per step in /tmp/sci/progress.
cd /work/wt-science
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 BATCHSIZE_STUDY_CACHE=/tmp/cache-science PYTHONPATH=/work/wt-science
S=/tmp/sci/default
P=/tmp/sci/perl
B="logger=csv trainer.enable_progress_bar=false"
PERL="data=text data.path=/usr/share/perl/5.36.0 data.glob=**/*.pm"
run() { name=$1; shift; /usr/bin/time -f "%e s wall" nice -n 5 python -m batchsize_study "$@" $B > /tmp/sci/log.$name 2>&1; echo "$name rc=$? $(date +%T) $(tail -1 /tmp/sci/log.$name)" >> /tmp/sci/progress; }
EXP="experiment=superconvergence schedule.warmup_shape=exponential detector.onset=min_loss detector.lag_correction=true"
run sc_exp $EXP study.dir=$S
run sweep16 experiment=lr_sweep batch_size=16 'sweep.lrs=[0.0009765625,0.001953125,0.00390625,0.0078125]' study.dir=$S
run perl_sc_exp $EXP study.dir=$P $PERL
run perl_sweep16 experiment=lr_sweep batch_size=16 'sweep.lrs=[0.0009765625,0.001953125,0.00390625,0.0078125]' study.dir=$P $PERL
