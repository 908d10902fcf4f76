#!/usr/bin/env bash
# The paper's protocol at reduced data, on one GPU: swin_tiny_patch4_window7_224 from scratch at 224 px,
# 100 epochs, DRLoc lambda 0.5 (the reference code's target scale, its 20-epoch lambda warm-up and decay),
# on N = 200 and 500 CIFAR-10 images per class, evaluated on the 10,000 test images; both arms of a pair
# train at the same time on the one GPU. Seeds are added while the time budget lasts: first seed 0 of
# both sizes, then seeds 0-1, then 0-2 (finished runs are skipped, so each stage only adds a seed).
#
#   bash benchmarks/gpu_study.sh /data/cifar10 [OUT] [extra train_drloc.py flags...]
#
# /data/cifar10 holds train/<class>/ and test/<class>/ images. Environment: BUDGET_S (default 600: seconds
# for the whole script; a stage still running then is stopped, and running the script again continues it),
# SIZES ("200 500"), EPOCHS (100), DEVICE (cuda; bf16 AMP on CUDA), WORKERS (7 data workers per training),
# COMPILE=1 adds --torchcompile. Extra flags go to every run after the recipe (the last value of a flag
# wins), so a quick try on the CPU at toy size is
#   SIZES=2 EPOCHS=1 DEVICE=cpu WORKERS=0 bash benchmarks/gpu_study.sh TOY_DIR OUT -b 4
# At the end the report covers every pair that has finished: OUT/results.md, OUT/results.json,
# OUT/top1_by_size.png; OUT/gpu.txt names the GPU and driver.
# Not yet run on a GPU. Estimated from the H100 step times in benchmarks/README.md (not measured): the
# N=200 pair of seed 0 takes 4-5 minutes, the N=500 pair 9-11 more, so the default budget stops inside it
# and a second call (or BUDGET_S=1000) finishes it; COMPILE=1 may fit seed 0 of both sizes in 10 minutes.
set -euo pipefail
DATA=${1:?usage: bash benchmarks/gpu_study.sh CIFAR10_DIR [OUT] [train_drloc.py flags...]}
OUT=${2:-gpu_study}
shift $(( $# >= 2 ? 2 : 1 ))
BUDGET_S=${BUDGET_S:-600}
SIZES=${SIZES:-200 500}
EPOCHS=${EPOCHS:-100}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-7}
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"

RECIPE=(
  --model swin_tiny_patch4_window7_224 --img-size 224 -b 128 --opt adamw --lr 5e-4 --weight-decay 0.05
  --sched cosine --warmup-epochs 5 --drop-path 0.2 --smoothing 0.1
  --aa rand-m9-mstd0.5 --reprob 0.25 --mixup 0.8 --cutmix 1.0
  --drloc-warmup-epochs 20 --drloc-decay
  --workers "$WORKERS" --val-interval 20 --checkpoint-hist 1 --log-interval 50
)
if [[ "$DEVICE" == cuda* ]]; then RECIPE+=(--amp --amp-dtype bfloat16 --pin-mem); fi
if [[ "${COMPILE:-0}" == 1 ]]; then RECIPE+=(--torchcompile); fi

common=(--data "$DATA" --eval-split test --sizes $SIZES --epochs "$EPOCHS" --drloc-lambda 0.5 --out "$OUT"
        --device "$DEVICE" "${RECIPE[@]}" "$@")

mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
start=$(date +%s)
for seeds in "0" "0 1" "0 1 2"; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 30 )); then echo "time budget spent before seeds $seeds"; break; fi
  echo "== seeds $seeds, sizes $SIZES, $EPOCHS epochs ($left s of the budget left)"
  # timeout's SIGTERM stops the study like Ctrl-C: its trainings stop and continue when this script runs again
  status=0
  timeout "$left" python "$HERE/small_data_study.py" --seeds $seeds --jobs 2 --progress-every 60 \
    "${common[@]}" || status=$?
  if (( status != 0 )); then echo "stage 'seeds $seeds' ended with status $status"; break; fi
done
python "$HERE/small_data_study.py" --seeds 0 1 2 --report-only "${common[@]}" > /dev/null \
  || echo "no pair finished within the budget: run the script again to continue"
echo "total $(( $(date +%s) - start )) s; report: $OUT/results.md"
