#!/usr/bin/env bash
# GPU check of timm-drloc, for a CUDA machine with torch but no network (and maybe an older timm).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
#
# What it runs (about 5-8 minutes on one H100; every part is time-boxed):
#   1. benchmarks/overhead.py on CUDA: swin_tiny / vit_small / resnet50 at 224, batch 64, bf16 autocast,
#      eager; then the same with torch.compile. Prints step-time and memory ratios and images/s.
#   2. the digits demo for 2 epochs (a baseline and a DRLoc run of train_drloc.py on the digits
#      ImageFolder), printing the images/s train_drloc.py logs.
#
# Preparing the wheels (on a machine WITH network, same Python version and platform as the GPU box):
#   pip download timm==1.0.31 huggingface-hub safetensors pyyaml scikit-learn matplotlib \
#       --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 -d benchmarks/wheels
#   (add torchvision==<the version matching the box's torch> if the box lacks torchvision; do not add torch.)
# Copy the repository, wheels included, to the GPU box. The script installs only what is missing, with
#   pip install --no-index --find-links benchmarks/wheels PACKAGE...
# and runs the project from its source tree (PYTHONPATH), so nothing needs building.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="${WHEELS:-$HERE/wheels}"
OUT="${1:-gpu_check_out}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - START ))s]"; }

# --- 1. dependencies: install what is missing from the wheels folder -----------------------------------
MISSING=$("$PY" - <<'EOF'
import importlib
need = []
try:
    import timm
    if timm.__version__ != '1.0.31':
        need.append('timm==1.0.31')
except ImportError:
    need.append('timm==1.0.31')
for module, package in (('sklearn', 'scikit-learn'), ('matplotlib', 'matplotlib'), ('yaml', 'pyyaml'),
                        ('safetensors', 'safetensors'), ('huggingface_hub', 'huggingface-hub')):
    try:
        importlib.import_module(module)
    except ImportError:
        need.append(package)
print(' '.join(need))
EOF
)
if [ -n "$MISSING" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "missing: $MISSING, and no wheels folder at $WHEELS. Prepare it as the header of $0 says." >&2
        exit 2
    fi
    echo "$(elapsed) installing from $WHEELS: $MISSING"
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING
fi
"$PY" - <<'EOF'
import torch, timm, timm_drloc
assert torch.cuda.is_available(), 'torch sees no CUDA device: this script is for a GPU machine'
print(f'torch {torch.__version__}, timm {timm.__version__}, timm_drloc {timm_drloc.__version__}, '
      f'GPU: {torch.cuda.get_device_name(0)}')
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# --- 2. overhead: eager, then torch.compile ------------------------------------------------------------
BENCH=(--device cuda --amp --batch-size 64 --steps 10 --warmup 3 --head-steps 50)
echo "$(elapsed) overhead, eager, bf16 autocast, batch 64"
timeout 150 "$PY" "$HERE/overhead.py" "${BENCH[@]}" 2>&1 | tee "$OUT/overhead_eager.txt" || \
    echo "overhead (eager) stopped early (exit $?); partial results above"
echo "$(elapsed) overhead, torch.compile, bf16 autocast, batch 64 (models print as they finish)"
timeout 270 "$PY" "$HERE/overhead.py" "${BENCH[@]}" --compile --skip-head 2>&1 | tee "$OUT/overhead_compile.txt" || \
    echo "overhead (compile) stopped early (exit $?); partial results above"

# --- 3. two epochs of train_drloc.py on the digits ImageFolder -----------------------------------------
echo "$(elapsed) digits: 2 epochs baseline + 2 epochs DRLoc (train_drloc.py, bf16 AMP)"
timeout 120 "$PY" -m timm_drloc.demo --out "$OUT/digits" --epochs 2 --seeds 0 --workers 4 \
    --amp --amp-dtype bfloat16 2>&1 | tee "$OUT/digits.txt" || echo "digits run stopped early (exit $?)"
for log in "$OUT"/digits/runs/*.log; do
    [ -f "$log" ] || continue
    rate=$(grep -o '[0-9.]*/s' "$log" | tail -1 || true)
    echo "$(basename "$log" .log): last logged training rate ${rate:-n/a} (images/s)"
done
echo "$(elapsed) done; outputs in $OUT"
