#!/usr/bin/env bash
# A short research sweep on a lent GPU machine (device tool): cohort and single-case configurations in
# parallel, under one deadline; results come back as one tarball.
#   bash benchmarks/gpu_sweep.sh COHORT.json SINGLE.json   (carry: .gpu, made by benchmarks/acdc_pack.py)
#   DRY=1 checks the script on the CPU with tiny budgets.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/PSCVSegment OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/pscv-sweep-out}; mkdir -p "$OUT"
WORK=/tmp/pscv-sweep; mkdir -p $WORK
DEVICE=cuda; DEADLINE=${DEADLINE:-150}; LIMIT=${LIMIT:-230}; FORCE='{}'; SEEDS=0,1
if [ "${DRY:-0}" = 1 ]; then DEVICE=cpu; FORCE='{"iterations": 2, "image_size": 32, "batch_size": 2}'; SEEDS=0; fi
START=$(date +%s)
python3 benchmarks/acdc_pack.py unpack .gpu/acdc.npz.xz $WORK/acdc || exit 1
echo "unpacked at $(( $(date +%s) - START )) s"
timeout $LIMIT python3 benchmarks/sweep.py "$1" --out $WORK/cohort --data $WORK/acdc --device $DEVICE --workers 4 \
  --seeds $SEEDS --deadline $DEADLINE --threads 1 --base '{"iterations": 1500, "image_size": 128}' --force "$FORCE" \
  > $WORK/cohort.log 2>&1 &
timeout $LIMIT python3 benchmarks/sweep.py "$2" --mode single --single-cases 5 --out $WORK/single --data $WORK/acdc \
  --device $DEVICE --workers 6 --deadline $DEADLINE --threads 1 \
  --base '{"iterations": 300, "image_size": 128, "batch_size": 8}' --force "$FORCE" > $WORK/single.log 2>&1 &
wait
rm -rf $WORK/acdc
tail -n 25 $WORK/cohort.log $WORK/single.log
tar czf "$OUT/sweep-results.tgz" -C $WORK .
echo "done at $(( $(date +%s) - START )) s"
