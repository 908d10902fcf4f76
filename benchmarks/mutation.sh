#!/usr/bin/env bash
# Mutation testing with mutmut 3 (pip install -e ".[dev]"); a benchmark, not part of .ci/run.
#   bash benchmarks/mutation.sh core    # the library core: timm_drloc/losses, head, grids, model, task, settings, trainable
#   bash benchmarks/mutation.sh train   # the run-critical functions of timm_drloc/train/, summary.py, hub.py, checkpoint.py
#   bash benchmarks/mutation.sh core-sample N [SEED]   # a seeded random sample of N of them (default seed 0)
#   bash benchmarks/mutation.sh train-sample N [SEED]
#   bash benchmarks/mutation.sh generate               # only write mutants/ (seconds; the samples do it first)
# Each mutant runs only the tests that reached the mutated function, picked from the fast ones by marker
# (core: neither slow nor training_run; train: not slow). Results accumulate in mutants/ (git-ignored);
# benchmarks/mutation_score.py prints the score per module. CPU-heavy: MUTATION_CHILDREN (default 2) workers,
# MUTATION_NICE (default 5) their niceness.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread per worker

generate() {  # mutmut run's first step alone: the mutated copies in mutants/ and their .meta listings
  python - <<'PY'
import mutmut.__main__ as m
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
m.makedirs('mutants', exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
print(m.create_mutants(1))
PY
}

train_names=(
  # a non-finite loss or weight stops the run (or skips the step under a loss scaler)
  'timm_drloc.train.loop.xǁNonFiniteStepsǁ*' 'timm_drloc.train.loop.x__loss_values__mutmut_*'
  'timm_drloc.train.loop.x__weights_finite_or_stop__mutmut_*'
  # which checkpoint --resume continues from, and in which folder
  'timm_drloc.train.checkpoints.x_find_resume_point__mutmut_*' 'timm_drloc.train.checkpoints.x__auto_resume_path__mutmut_*'
  'timm_drloc.train.checkpoints.x_is_recovery__mutmut_*'
  # checkpoints appear whole or not at all
  'timm_drloc.train.checkpoints.xǁAtomicCheckpointSaverǁ*'
  # the task a run trains, and its DRLoc weight per epoch
  'timm_drloc.train.build.x_build_task__mutmut_*' 'timm_drloc.settings.x_drloc_lambda_for_epoch__mutmut_*'
  # summary.csv: written per epoch, trimmed on resume, an earlier run moved aside
  'timm_drloc.summary.x_append_summary__mutmut_*' 'timm_drloc.summary.x_read_summary__mutmut_*'
  'timm_drloc.train.checkpoints.x_open_run_folder__mutmut_*' 'timm_drloc.train.checkpoints.x_move_earlier_run_aside__mutmut_*'
  # export of a training checkpoint (hub.py, checkpoint.py) and the push after training
  'timm_drloc.hub.x_export__mutmut_*' 'timm_drloc.hub.x__plain_model__mutmut_*' 'timm_drloc.hub.x_training_data_config__mutmut_*'
  'timm_drloc.checkpoint.x_read_checkpoint__mutmut_*' 'timm_drloc.checkpoint.x_backbone_state_dict__mutmut_*'
  'timm_drloc.checkpoint.x_classifier_size__mutmut_*' 'timm_drloc.checkpoint.x_create_model_args__mutmut_*'
  'timm_drloc.checkpoint.x_checkpoint_model__mutmut_*' 'timm_drloc.checkpoint.x__load_weights__mutmut_*'
  'timm_drloc.train.publish.x_hub_checkpoint__mutmut_*' 'timm_drloc.train.publish.x_push_after_training__mutmut_*'
)

case "${1:-core}" in
  generate)
    generate; exit;;
  core)
    export PYTEST_ADDOPTS='-m "not slow and not training_run"'
    names=('timm_drloc.losses.*' 'timm_drloc.head.*' 'timm_drloc.grids.*' 'timm_drloc.model.*' 'timm_drloc.task.*'
           'timm_drloc.settings.*' 'timm_drloc.trainable.*');;
  core-sample)
    export PYTEST_ADDOPTS='-m "not slow and not training_run"'
    generate >/dev/null
    mapfile -t names < <(python benchmarks/mutation_score.py --sample "${2:?give the sample size}" --seed "${3:-0}");;
  train|train-sample)
    export PYTEST_ADDOPTS='-m "not slow"'
    names=("${train_names[@]}")
    if [ "$1" = train-sample ]; then
      generate >/dev/null
      mapfile -t names < <(python benchmarks/mutation_score.py --sample "${2:?give the sample size}" --seed "${3:-0}" \
                           --match "${names[@]}")
    fi;;
  *) echo "usage: $0 core|train|core-sample N [SEED]|train-sample N [SEED]|generate" >&2; exit 2;;
esac
nice -n "${MUTATION_NICE:-5}" mutmut run --max-children "${MUTATION_CHILDREN:-2}" "${names[@]}"
python benchmarks/mutation_score.py
