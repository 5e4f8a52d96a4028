#!/bin/bash
# Device run of the paper's grid: `sammix experiment` over every method, k in {5, 50, 100} and
# seeds {0, 1, 2} at the full setting (10 epochs) on lits-slices, cross-domain on totalseg-example,
# several cells at once on one GPU; beside it, two ablation grids of SAM-Mix (k in {5, 50}): 4x the
# SAM steps, and 4x the SAM steps with half the SAM samples prompted by jittered ground-truth boxes.
# A grid cut short by LIMIT is reported as it stands (--no-train). Brings back the report folders
# without weights, plus the weights of SAM-Mix k=50 seed 0 (for the CPU predict benchmark).
# Run from the repo root: bash benchmarks/device_grid.sh (D: data folder, OUT: where results go).
PY=${PY:-python3}; D=${D:-../shared/data}; LIMIT=${LIMIT:-420}; EPOCHS=${EPOCHS:-10}; DEV=${DEV:-cuda}
KS=${KS:-5,50,100}; SEEDS=${SEEDS:-0,1,2}; METHODS=${METHODS:-all}; JOBS=${JOBS:-8}
E=${E:-/tmp/sammix-grid}; O=${OUT:-/tmp/out}
export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 SAMMIX_CACHE=$E/cache
mkdir -p $E $O
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) | tee $O/gpu.txt
grid() {  # name methods ks jobs time-limit extra-options...
  local name=$1 methods=$2 ks=$3 jobs=$4 limit=$5; shift 5
  timeout -k 10 $limit $PY -m sammix.cli experiment \
    --train-data $D/lits-slices --cls-only-data $D/totalseg-example --test-data totalseg=$D/totalseg-example \
    --methods $methods --k $ks --seeds $SEEDS --epochs $EPOCHS --window 127.5,255 \
    --device $DEV --out $E/$name --jobs $jobs "$@"
}
A1="--set train.sam_samples_per_epoch=128"; A2="$A1 --set train.gt_box_jitter=0.5"; AKS=${AKS:-5,50}
$PY -m sammix.cli prepare $D/lits-slices --window 127.5,255 > $E/prepare.log 2>&1  # caches made once, before the grids
$PY -m sammix.cli prepare $D/totalseg-example --window 127.5,255 >> $E/prepare.log 2>&1
start=$(date +%s)
grid grid $METHODS $KS $JOBS $LIMIT > $O/grid.log 2>&1 &
grid samples128 sammix $AKS 6 $LIMIT $A1 > $O/samples128.log 2>&1 &
grid jitter sammix $AKS 6 $LIMIT $A2 > $O/jitter.log 2>&1 &
wait
pkill -9 -f multiprocessing  # workers of a grid cut short
echo "grids stopped after $(( $(date +%s) - start )) s" | tee -a $O/gpu.txt
[ -f $E/grid/report.md ] || grid grid $METHODS $KS $JOBS 100 --no-train >> $O/grid.log 2>&1
[ -f $E/samples128/report.md ] || grid samples128 sammix $AKS $JOBS 60 $A1 --no-train >> $O/samples128.log 2>&1
[ -f $E/jitter/report.md ] || grid jitter sammix $AKS $JOBS 60 $A2 --no-train >> $O/jitter.log 2>&1
for name in grid samples128 jitter; do
  echo "== $name"; grep -v -i warn $O/$name.log | grep -E "trained in|FAILED|done in" | tail -n 50
  sed -n "/^| method/,/^$/p" $E/$name/report.md
  cp $O/$name.log $E/$name/run.log; rm $O/$name.log
  (cd $E/$name && tar czf $E/$name.tgz --exclude='*.pt' .)
  split -b 15M $E/$name.tgz $O/$name.tgz.part-  # at most 16 MiB per file comes back
done
[ -f $E/grid/runs/sammix-k50-s0/best.pt ] && split -b 15M $E/grid/runs/sammix-k50-s0/best.pt $O/sammix-k50-s0-best.pt.part-
ls -la $O
