#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): the paper profile of `pscv bench acdc` (four
# methods as four concurrent processes), a training-throughput probe, and a research sweep (cohort) on the
# ACDC val patients, everything under one deadline. Results come back as one tarball.
#   carry: .gpu (acdc.npz.xz, made by benchmarks/acdc_pack.py pack)
#   DRY=1 runs the same steps with tiny budgets on the CPU, to check the script before spending GPU time.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/PSCVSegment OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/pscv-gpu-out}; mkdir -p "$OUT"
WORK=/tmp/pscv-gpu; mkdir -p $WORK
DEVICE=cuda; BUDGET=330; PROBE_ITERS=150; FORCE='{}'
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; BUDGET=100; PROBE_ITERS=3
  FORCE='{"iterations": 2, "image_size": 32, "batch_size": 2}'
fi
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > $WORK/machine.txt 2>&1
cat $WORK/machine.txt
python3 benchmarks/acdc_pack.py unpack .gpu/acdc.npz.xz $WORK/acdc || exit 1
echo "unpacked at $(elapsed) s"

# Throughput: 1 process, then 4 concurrent ones (as the paper profile runs), 256 px, batch 12.
python3 benchmarks/gpu_probe.py --processes 1 --iterations $PROBE_ITERS --device $DEVICE | tee $WORK/probe1.json
python3 benchmarks/gpu_probe.py --processes 4 --iterations $PROBE_ITERS --device $DEVICE | tee $WORK/probe4.json
PER_ITER=$(python3 -c "import json; print(json.load(open('$WORK/probe4.json'))['slowest_seconds_per_iteration'])")
# The paper runs share the GPU with the sweeps too: plan for 60% of the probed speed, within BUDGET.
ITERS=$(python3 -c "print(max(1000, min(30000, int($BUDGET * 0.6 / $PER_ITER) // 1000 * 1000)))")
[ "${DRY:-0}" = 1 ] && ITERS=2
echo "paper profile: $ITERS iterations ($PER_ITER s/iteration with 4 processes) at $(elapsed) s"

for method in pce ms pscv full; do
  timeout $((BUDGET + 120)) python3 -m pscv.cli bench acdc --profile paper --data $WORK/acdc --out $WORK/paper \
    --methods $method --iterations $ITERS --device $DEVICE > $WORK/paper_$method.log 2>&1 &
done
timeout $((BUDGET + 60)) python3 benchmarks/sweep.py benchmarks/configs/cohort.json --out $WORK/sweep-cohort \
  --data $WORK/acdc --device $DEVICE --workers 4 --seeds 0,1 --deadline $((BUDGET - 60)) \
  --base '{"iterations": 1500, "image_size": 128}' --force "$FORCE" > $WORK/sweep_cohort.log 2>&1 &
wait
echo "all streams ended at $(elapsed) s"
# One report with every method measured. (The single-case mode runs on the CPU: `pscv bench interactive`.)
python3 -m pscv.cli bench acdc --profile paper --data $WORK/acdc --out $WORK/paper --methods none \
  --device $DEVICE > $WORK/paper_report.log 2>&1
rm -rf $WORK/paper/models $WORK/acdc
tail -n 30 $WORK/sweep_cohort.log
cat $WORK/paper/results.md
tar czf "$OUT/gpu-results.tgz" -C $WORK .
echo "done at $(elapsed) s"
