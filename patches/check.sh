#!/usr/bin/env bash
# Check patches/timm-train-drloc.patch against an upstream timm train.py.
#
# Usage: patches/check.sh TRAIN_PY
#
# In a temporary folder: copies TRAIN_PY, applies the patch with `git apply`, writes a tiny ImageFolder
# of generated PNGs (3 classes), trains each model of CHECK_MODELS for one epoch on the CPU with
# --drloc-lambda 0.5, and checks that summary.csv has a drloc_loss column, that last.pth.tar exists and
# that its task_state holds the DRLoc heads while its state_dict is a plain timm state dict.
# Exits non-zero at the first failure.
#
# Environment:
#   PYTHON        python with torch, timm and timm_drloc installed (default: python)
#   CHECK_MODELS  space-separated models to train (default: "resnet18 vit_tiny_patch16_224")
#   KEEP=1        keep the temporary folder (its path is printed)
set -euo pipefail

if [[ $# -ne 1 || ! -f "$1" ]]; then
    echo "usage: $0 TRAIN_PY   (TRAIN_PY: train.py of a huggingface/pytorch-image-models checkout)" >&2
    exit 2
fi
TRAIN_PY=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
PATCH=$(cd "$(dirname "$0")" && pwd)/timm-train-drloc.patch
PYTHON=${PYTHON:-python}
CHECK_MODELS=${CHECK_MODELS:-resnet18 vit_tiny_patch16_224}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/drloc-patch-check.XXXXXX")
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi

step() { echo "== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "versions: $("$PYTHON" -c 'import torch, timm, timm_drloc; print(f"torch {torch.__version__}, timm {timm.__version__}, timm_drloc {timm_drloc.__version__}")')"

step "applying $(basename "$PATCH") to a copy of $TRAIN_PY"
cp "$TRAIN_PY" "$WORK/train.py"
(cd "$WORK" && git apply --check "$PATCH" && git apply "$PATCH") || fail "git apply rejected the patch for $TRAIN_PY"
grep -q "timm_drloc.DRLocTask(" "$WORK/train.py" || fail "patched train.py does not build timm_drloc.DRLocTask"
"$PYTHON" "$WORK/train.py" --help | grep -q -- "--drloc-lambda" || fail "patched train.py has no --drloc-lambda flag"
echo "patched train.py: $(grep -c -- "--drloc-" "$WORK/train.py") lines naming --drloc-* flags"

step "writing a tiny ImageFolder (3 classes x 8 train / 4 validation PNGs of 72x72) to $WORK/data"
"$PYTHON" - "$WORK/data" <<'EOF'
import os
import sys

import numpy as np
from PIL import Image

root = sys.argv[1]
rng = np.random.default_rng(0)
for split, count in (('train', 8), ('validation', 4)):
    for label in range(3):
        folder = os.path.join(root, split, f'class_{label}')
        os.makedirs(folder)
        for i in range(count):
            img = rng.integers(0, 64, (72, 72, 3), dtype=np.uint8)
            img[:, :, label] += 128  # each class has its own dominant colour
            Image.fromarray(img).save(os.path.join(folder, f'{i}.png'))
EOF

for MODEL in $CHECK_MODELS; do
    OUT="$WORK/output"
    EXTRA=()
    if [[ "$MODEL" == vit_* || "$MODEL" == deit_* ]]; then
        EXTRA=(--model-kwargs img_size=64)  # fixed-size ViTs: build them for the 64x64 input
    fi
    step "training $MODEL for 1 epoch on the CPU with --drloc-lambda 0.5"
    (cd "$WORK" && "$PYTHON" train.py data --model "$MODEL" "${EXTRA[@]}" --img-size 64 --num-classes 3 \
        --device cpu --no-prefetcher --workers 0 -b 8 --epochs 1 --lr 1e-3 --opt adamw --log-interval 1 \
        --output "$OUT" --experiment "$MODEL" --drloc-lambda 0.5 --drloc-hidden-dim 64 --drloc-warmup-epochs 0 \
        > "$WORK/$MODEL.log" 2>&1) || { tail -30 "$WORK/$MODEL.log" >&2; fail "train.py exited non-zero for $MODEL"; }
    grep -hE "DRLocTask( over [A-Za-z]+)?:" "$WORK/$MODEL.log" | sed 's/^/   /' || fail "train.py did not log the DRLocTask set-up for $MODEL"

    step "checking $OUT/$MODEL"
    "$PYTHON" - "$OUT/$MODEL" <<'EOF' || fail "outputs of $MODEL are not what a DRLoc run writes"
import csv
import os
import sys

import torch

run = sys.argv[1]
with open(os.path.join(run, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
assert rows, 'summary.csv has no rows'
assert 'train_drloc_loss' in rows[0], f'summary.csv has no train_drloc_loss column: {list(rows[0])}'
drloc_loss = float(rows[0]['train_drloc_loss'])
assert drloc_loss > 0, f'train_drloc_loss is {drloc_loss}'
ckpt = torch.load(os.path.join(run, 'last.pth.tar'), map_location='cpu', weights_only=False)
heads = ckpt.get('task_state', {}).get('drloc_heads')
assert heads, f"checkpoint task_state has no drloc_heads (keys: {list(ckpt)})"
assert not any(k.startswith(('heads.', 'model.')) for k in ckpt['state_dict']), 'state_dict is not a plain timm one'
print(f'   summary.csv: {len(rows)} epoch(s), train_loss {float(rows[0]["train_loss"]):.3f}, '
      f'train_drloc_loss {drloc_loss:.3f}, eval_top1 {float(rows[0]["eval_top1"]):.1f}')
print(f"   last.pth.tar: state_dict {len(ckpt['state_dict'])} tensors (plain timm keys), "
      f"task_state['drloc_heads'] {len(heads)} tensors")
EOF
done
TEACHER_MODEL=${CHECK_MODELS%% *}
step "distillation + DRLoc: $TEACHER_MODEL's checkpoint exported (timm-drloc export) as the teacher of a ViT"
"$PYTHON" -m timm_drloc.cli export "$WORK/output/$TEACHER_MODEL/last.pth.tar" "$WORK/teacher" > "$WORK/export.log" 2>&1 \
    || { tail -20 "$WORK/export.log" >&2; fail "timm-drloc export failed for $TEACHER_MODEL"; }
(cd "$WORK" && "$PYTHON" train.py data --model vit_tiny_patch16_224 --model-kwargs img_size=64 depth=2 --img-size 64 \
    --num-classes 3 --device cpu --no-prefetcher --workers 0 -b 8 --epochs 1 --lr 1e-3 --opt adamw \
    --output "$WORK/output" --experiment kd --kd-model-name "local-dir:$WORK/teacher" --kd-distill-type logit \
    --drloc-lambda 0.5 --drloc-hidden-dim 64 > "$WORK/kd.log" 2>&1) \
    || { tail -30 "$WORK/kd.log" >&2; fail "train.py exited non-zero for distillation + DRLoc"; }
grep -hE "DRLocTask over LogitDistillationTask:" "$WORK/kd.log" | sed 's/^/   /' \
    || fail "train.py did not add DRLoc to the distillation task"
"$PYTHON" - "$WORK/output/kd" <<'EOF' || fail "outputs of distillation + DRLoc are not what a DRLoc run writes"
import csv
import os
import sys

import torch

run = sys.argv[1]
with open(os.path.join(run, 'summary.csv')) as f:
    row = next(csv.DictReader(f))
assert float(row['train_drloc_loss']) > 0, f"train_drloc_loss is {row.get('train_drloc_loss')}"
ckpt = torch.load(os.path.join(run, 'last.pth.tar'), map_location='cpu', weights_only=False)
assert ckpt.get('task_state', {}).get('drloc_heads'), f"no drloc_heads in task_state ({list(ckpt)})"
print(f"   summary.csv: train_loss {float(row['train_loss']):.3f}, train_drloc_loss {float(row['train_drloc_loss']):.3f}")
EOF
step "OK: the patch applies to $TRAIN_PY and trains with DRLoc ($CHECK_MODELS, and over logit distillation)"
