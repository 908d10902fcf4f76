#!/usr/bin/env bash
# DRLoc's step-time ratios on one GPU, with the A/A spread, in about ten minutes of an H100.
#
#   bash benchmarks/gpu_ratios.sh [OUT_DIR [PART...]]     # default: gpu_ratios_out, parts eager compiled-64
#   DEVICE=cpu bash benchmarks/gpu_ratios.sh OUT           # toy run on a CPU (tiny models, batch 4 and 8)
#
# Parts (each time-boxed; models print as they finish, what a box cuts off is said so):
#   eager        about 4 min: Swin-T, ViT-S, ResNet-50 at batch 64 and 128, bf16 autocast; ratios of
#                A/A timm, DRLoc (eager head) and DRLoc with compile_head=True against timm, and the GPU
#                kernels of one step of each (benchmarks/gpu_ratios.py --mode eager)
#   compiled-64  about 5 min: the same models with task.compile() (whole model, heads inside) at batch 64
#   compiled-128 the same at batch 128 (another ~5 min: run it as a second call when the first fits)
#   cudagraphs   about 3 min: the eager part at batch 64 with the heads compiled in mode reduce-overhead
#                (CUDA graphs for the head's step; untested so far: a separate call)
# Dependencies and PYTHONPATH as gpu_check.sh (gpu_env.sh: timm 1.0.31 from benchmarks/wheels if missing).
set -euo pipefail

OUT="${1:-gpu_ratios_out}"
shift || true
if [ $# -gt 0 ]; then PARTS=("$@"); else PARTS=(eager compiled-64); fi
mkdir -p "$OUT"
# shellcheck source=gpu_env.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gpu_env.sh"

if [ "${DEVICE:-cuda}" = cpu ]; then  # toy sizes: checks that every part runs, measures nothing
    COMMON=(--device cpu --models tiny_vit resnet18 --img-size 64 --steps 5 --warmup 2)
    SMALL=4; LARGE=8; EAGER_S=1500; COMPILED_S=1500; LIMIT_S=600
else
    COMMON=(--device cuda --steps 20 --warmup 5)
    SMALL=64; LARGE=128; EAGER_S=270; COMPILED_S=330; LIMIT_S=200
fi
ratios() {  # name timeout args...
    local name="$1" limit="$2"; shift 2
    echo "$(elapsed) $name"
    timeout "$limit" "$PY" "$HERE/gpu_ratios.py" "${COMMON[@]}" "$@" 2>&1 | tee "$OUT/$name.txt" || \
        echo "$name stopped early (exit $?); partial results above"
}
for part in "${PARTS[@]}"; do
    case "$part" in
        eager) ratios eager "$EAGER_S" --mode eager --batch-sizes "$SMALL" "$LARGE" ;;
        compiled-64) ratios compiled-64 "$COMPILED_S" --mode compiled --batch-sizes "$SMALL" --time-limit "$LIMIT_S" ;;
        compiled-128)
            ratios compiled-128 "$COMPILED_S" --mode compiled --batch-sizes "$LARGE" --time-limit "$LIMIT_S" ;;
        cudagraphs) ratios cudagraphs "$EAGER_S" --mode eager --head-mode reduce-overhead --batch-sizes "$SMALL" ;;
        *) echo "unknown part '$part': use eager, compiled-64, compiled-128 or cudagraphs" >&2; exit 2 ;;
    esac
done
echo "$(elapsed) done; outputs in $OUT"
