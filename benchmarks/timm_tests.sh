#!/usr/bin/env bash
# timm 1.0.31's own tests of train.py, run against this checkout's train_drloc.py (put in train.py's place).
#   bash benchmarks/timm_tests.sh [extra pytest args]
# Fetches the timm 1.0.31 source distribution (its tests/ folder) from the package index into a scratch folder.
# Runs test_train_resume.py, test_checkpoint_loading.py and the train.py tests of test_multilabel.py; these need
# the `datasets` package (installed into the scratch folder when missing). Left out: the one test that also
# needs timm's validate.py (not in the source distribution), and test_sweep*.py (they need timm's sweep.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d /tmp/timm_tests.XXXX)
cd "$scratch"
python -m pip download -q --no-deps --no-binary :all: timm==1.0.31 -d . >/dev/null
tar xzf timm-1.0.31.tar.gz
cp -r timm-1.0.31/tests tests
cp "$repo/train_drloc.py" train.py
python=python
if ! python -c 'import datasets' 2>/dev/null; then  # a venv on top of this one, with datasets added
  python -m venv --system-site-packages venv
  venv/bin/python -m pip install -q datasets >/dev/null
  python=venv/bin/python
fi
export PYTHONPATH="$scratch:$repo"
"$python" -m pytest -q -p no:cacheprovider tests/test_train_resume.py tests/test_checkpoint_loading.py \
  "tests/test_multilabel.py" -k "not test_multilabel.py or (cli and not validate_cli)" "$@"
