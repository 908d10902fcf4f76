# Sourced by gpu_check.sh and gpu_ratios.sh: sets HERE, ROOT, PY, START and elapsed(), puts the source
# tree on PYTHONPATH, installs what is missing from the wheels folder (see gpu_check.sh's header) and
# prints the versions and the GPU. DEVICE=cpu lets a CPU machine through (toy runs of the scripts).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # benchmarks/
ROOT="$(dirname "$HERE")"
WHEELS="${WHEELS:-$HERE/wheels}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - START ))s]"; }

# --- dependencies: install what is missing from the wheels folder -----------------------------------
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
    SITE="${SITE:-/tmp/timm_drloc_site}"
    FILES=()
    for package in $MISSING; do
        name="${package%%==*}"
        version="${package#*==}"; [ "$version" = "$package" ] && version=''
        pattern="$WHEELS/$(echo "$name" | tr '-' '_')-${version:-*}-*.whl"
        # shellcheck disable=SC2206
        found=( $pattern )
        if [ ! -f "${found[0]}" ]; then
            echo "missing: $package, and no wheel matching $pattern. Prepare it as the header of $0 says." >&2
            exit 2
        fi
        FILES+=("${found[0]}")
    done
    echo "$(elapsed) installing into $SITE: ${FILES[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${FILES[@]}"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#$ROOT}"
fi
"$PY" - <<'EOF'
import torch, timm, timm_drloc
import os
on_cpu = os.environ.get('DEVICE') == 'cpu'
assert on_cpu or torch.cuda.is_available(), 'torch sees no CUDA device: this script is for a GPU machine'
print(f'torch {torch.__version__}, timm {timm.__version__}, timm_drloc {timm_drloc.__version__}, '
      f'device: {"CPU (DEVICE=cpu)" if on_cpu else torch.cuda.get_device_name(0)}')
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

