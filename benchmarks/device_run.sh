#!/bin/bash
# Device run: SAM-Mix k=50 and k=5 on lits-slices (+ totalseg liver-free slices for the classifier),
# evaluated on the held-out test cases and cross-domain on totalseg; plus the CUDA-path check.
# Run from the repo root: bash benchmarks/device_run.sh (on the GPU machine the data were copied to .gpudata: D=.gpudata).
# env: PY (python), DEV (cuda|cpu), EPOCHS, LIMIT (seconds per training), KS, D (data folder)
PY=${PY:-python3}; DEV=${DEV:-cuda}; EPOCHS=${EPOCHS:-10}; LIMIT=${LIMIT:-115}; KS=${KS:-"50 5"}
D=${D:-../shared/data}; R=${R:-/tmp/sammix-runs}; O=${OUT:-/tmp/out}; W=$R/res
export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 SAMMIX_CACHE=$R/cache
mkdir -p $R $W $O
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) | tee $W/gpu.txt
job() {
  k=$1
  start=$(date +%s)
  timeout $LIMIT $PY -m sammix.cli train --data $D/lits-slices --cls-only-data $D/totalseg-example \
    --labeled $k --seed 0 --window 127.5,255 --epochs $EPOCHS --out $R/k$k --device $DEV > $W/train_k$k.txt 2>&1
  echo "train k=$k exit $? after $(( $(date +%s) - start )) s" >> $W/summary.txt
  $PY -m sammix.cli evaluate --run $R/k$k --data $D/lits-slices --split test --out $W/k${k}_lits_test.json --device $DEV >> $W/summary.txt 2>&1
  $PY -m sammix.cli evaluate --run $R/k$k --data $D/totalseg-example --out $W/k${k}_totalseg.json --device $DEV >> $W/summary.txt 2>&1
  cp $R/k$k/log.jsonl $W/k${k}_log.jsonl; cp $R/k$k/split.json $W/k${k}_split.json; cp $R/k$k/labeled.json $W/k${k}_labeled.json
  cp $R/k$k/config.yaml $W/k${k}_config.yaml; split -b 15M $R/k$k/best.pt $O/k${k}_best.pt.part-
}
for k in $KS; do job $k & done
$PY benchmarks/cuda_check.py --device $DEV ${CHECK_ARGS:-} --out $W/cuda_check.json > $W/cuda_check.txt 2>&1
wait
cat $W/summary.txt $W/cuda_check.txt | grep -v Warning
for k in $KS; do tail -n 3 $W/k${k}_log.jsonl; done
tar czf $O/results.tgz -C $R res
