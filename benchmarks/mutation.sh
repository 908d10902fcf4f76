#!/usr/bin/env bash
# Mutation testing with mutmut 3 (pip install -e ".[dev]"); a benchmark, not part of .ci/run.
#   bash benchmarks/mutation.sh core    # timm_drloc/losses, head, grids, model, task
#   bash benchmarks/mutation.sh train   # the run-critical functions of timm_drloc/train.py and hub.py
#   bash benchmarks/mutation.sh core-sample N   # a seeded random sample of N of them (core-sample, train-sample:
#   bash benchmarks/mutation.sh train-sample N  # need mutants/ from an earlier run, even an interrupted one)
# Each mutant runs only the tests that reached the mutated function, picked from the fast ones by marker
# (core: neither slow nor training_run; train: not slow). Results accumulate in mutants/;
# benchmarks/mutation_score.py prints the score per module. CPU-heavy: MUTATION_CHILDREN (default 2) workers.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread per worker
case "${1:-core}" in
  core)
    export PYTEST_ADDOPTS='-m "not slow and not training_run"'
    names=('timm_drloc.losses.*' 'timm_drloc.head.*' 'timm_drloc.grids.*' 'timm_drloc.model.*' 'timm_drloc.task.*');;
  core-sample)
    export PYTEST_ADDOPTS='-m "not slow and not training_run"'
    mapfile -t names < <(python benchmarks/mutation_score.py --sample "${2:?give the sample size}");;
  train|train-sample)
    export PYTEST_ADDOPTS='-m "not slow"'
    names=('timm_drloc.train.x__finite_or_stop__mutmut_*' 'timm_drloc.train.x__trim_summary__mutmut_*'
           'timm_drloc.train.x_write_summary__mutmut_*' 'timm_drloc.train.xǁAtomicCheckpointSaverǁ_duplicate__mutmut_*'
           'timm_drloc.train.x__auto_resume_path__mutmut_*' 'timm_drloc.train.x__resolve_resume__mutmut_*'
           'timm_drloc.train.x__build_task__mutmut_*' 'timm_drloc.train.x__drloc_lambda__mutmut_*'
           'timm_drloc.hub.x_export__mutmut_*' 'timm_drloc.hub.x_checkpoint_state_dict__mutmut_*' 'timm_drloc.hub.x_build_model__mutmut_*'
           'timm_drloc.hub.x__classifier_size__mutmut_*' 'timm_drloc.hub.x_hub_checkpoint__mutmut_*'
           'timm_drloc.hub.x_push_after_training__mutmut_*')
    if [ "$1" = train-sample ]; then
      mapfile -t names < <(python benchmarks/mutation_score.py --sample "${2:?give the sample size}" --match "${names[@]}")
    fi;;
  *) echo "usage: $0 core|train|core-sample N|train-sample N" >&2; exit 2;;
esac
nice -n 5 mutmut run --max-children "${MUTATION_CHILDREN:-2}" "${names[@]}"
python benchmarks/mutation_score.py
