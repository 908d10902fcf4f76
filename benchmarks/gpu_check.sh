#!/usr/bin/env bash
# GPU check of timm-drloc, for a CUDA machine with torch but no network (and maybe an older timm).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
#
# What it runs (about 5-8 minutes on one H100; every part is time-boxed, the cheap parts first):
#   1. benchmarks/overhead.py on CUDA: swin_tiny / vit_small / resnet50 at 224, batch 64, bf16 autocast,
#      eager, with the head-alone comparison. Prints step-time and memory ratios and images/s.
#   2. benchmarks/gpu_diag.py, eager: how much of each step the GPU is busy, with and without DRLoc,
#      and a check for host-device synchronizations in the DRLoc step.
#   3. the digits demo for 2 epochs (a baseline and a DRLoc run of train_drloc.py on the digits
#      ImageFolder, bf16 AMP), printing the images/s train_drloc.py logs.
#   4. the overhead benchmark again with torch.compile (models print as they finish; compiling six
#      models takes most of this part, and what is not done after 270 s is left out).
#
# Preparing the wheels (on a machine WITH network; timm is pure Python, so any platform will do):
#   pip download --no-deps timm==1.0.31 -d benchmarks/wheels
#   (and scikit-learn, matplotlib, pyyaml, safetensors, huggingface-hub wheels for the box's Python and
#   platform if it lacks them; never torch.)
# Copy the repository, wheels included, to the GPU box. The script installs only what is missing, with
#   pip install --no-index --no-deps --target $SITE WHEEL...   (SITE default: /tmp/timm_drloc_site)
# and puts SITE and the source tree on PYTHONPATH, so the Python environment itself is not changed.
set -euo pipefail

OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
# shellcheck source=gpu_env.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gpu_env.sh"

# --- 1. overhead, eager, then 2. GPU busy time ------------------------------------------------------
BENCH=(--device cuda --amp --batch-size 64 --steps 10 --warmup 3 --head-steps 50)
echo "$(elapsed) overhead, eager, bf16 autocast, batch 64"
timeout 90 "$PY" "$HERE/overhead.py" "${BENCH[@]}" 2>&1 | tee "$OUT/overhead_eager.txt" || \
    echo "overhead (eager) stopped early (exit $?); partial results above"
echo "$(elapsed) GPU busy time per step, eager (gpu_diag.py)"
timeout 75 "$PY" "$HERE/gpu_diag.py" --models resnet50 vit_small_patch16_224 swin_tiny_patch4_window7_224 2>&1 | \
    tee "$OUT/gpu_diag_eager.txt" || echo "gpu_diag stopped early (exit $?); partial results above"
# --- 3. two epochs of train_drloc.py on the digits ImageFolder -----------------------------------------
echo "$(elapsed) digits: 2 epochs baseline + 2 epochs DRLoc (train_drloc.py, bf16 AMP)"
timeout 70 "$PY" -m timm_drloc.demo --out "$OUT/digits" --epochs 2 --seeds 0 --workers 4 \
    --amp --amp-dtype bfloat16 2>&1 | tee "$OUT/digits.txt" || echo "digits run stopped early (exit $?)"
for log in "$OUT"/digits/runs/*.log; do
    [ -f "$log" ] || continue
    rate=$(grep -o '[0-9][0-9.]*/s' "$log" | tail -1 || true)
    echo "$(basename "$log" .log): last logged training rate ${rate:-n/a} (images/s)"
done
# --- 4. overhead with torch.compile --------------------------------------------------------------------
echo "$(elapsed) overhead, torch.compile, bf16 autocast, batch 64 (models print as they finish)"
timeout 270 "$PY" "$HERE/overhead.py" "${BENCH[@]}" --compile --skip-head 2>&1 | tee "$OUT/overhead_compile.txt" || \
    echo "overhead (compile) stopped early (exit $?); partial results above"

echo "$(elapsed) done; outputs in $OUT"
