"""Hyperparameter sweeps: python -m tpu_lm.sweep --config=configs/X.py --space=SPACE --trials=N

  python -m tpu_lm.sweep --config=configs/tiny.py --trials=8 \\
      --space='optim.learning_rate=loguniform(1e-4, 3e-2); model.num_layers=int(1, 3)'

Each trial is a full training run in <sweep_dir>/trials/<study>/NNNN (a run directory
like any other: generate, serve and evaluate read it; it belongs to its study and trial,
tpu_lm/sweeps/trial_dirs.py); its objective is a metric of its final eval (--metric,
default eval_bpb; one the config's task produces), and the pruner stops unpromising
trials at their intermediate evals (every config.eval_every_steps). The study lives in --storage:
by default a SQLite file in the sweep directory; any database URL Optuna accepts
(postgresql://..., mysql://...) or journal:FILE lets several workers on several hosts
share it: start the same command on each. --trials is the study's total, whoever runs
them. Run the command again to resume a stopped sweep; --report_only rewrites the
table and plots (of the study's own parameters: it needs no --space). A sweep whose
every trial failed exits with code 2 and the first error. Search-space syntax:
tpu_lm/sweeps/space.py.
"""

import os

from absl import flags
from ml_collections import config_flags

from tpu_lm import cli
from tpu_lm.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config every trial starts from.",
                                          lock_config=True)
_SPACE = flags.DEFINE_multi_string("space", [], "FIELD=KIND(ARGS) entries (';'-separated or repeated).")
_TRIALS = flags.DEFINE_integer("trials", 10, "Trials in the study, counting every worker's.")
_METRIC = flags.DEFINE_string("metric", "eval_bpb", "The final eval's metric to optimize.")
_DIRECTION = flags.DEFINE_string("direction", "", "minimize or maximize (default: from the metric's name).")
_SAMPLER = flags.DEFINE_string("sampler", "tpe", "tpe (Optuna's TPE) or random.")
_PRUNER = flags.DEFINE_string("pruner", "median", "median, hyperband or none.")
_STORAGE = flags.DEFINE_string("storage", "", "sqlite:///FILE, a database URL or journal:FILE (default: SQLite in"
                               " the sweep directory).")
_STUDY = flags.DEFINE_string("study", "", "The study's name in the storage (default: the config's name).")
_DIR = flags.DEFINE_string("sweep_dir", "", "Where trials and results go (default: workdirs/sweeps/<config>).")
_SEED = flags.DEFINE_integer("seed", -1, "The sampler's seed (default: a fresh one per worker, so workers sample apart).")
_REPORT = flags.DEFINE_bool("report_only", False, "Only write the results table and plots of the study (no --space"
                            " needed).")
flags.mark_flags_as_required(["config"])


def body() -> None:
  filename = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  if not os.path.isfile(filename):
    raise UserError(cli.missing_config(filename))
  name = os.path.splitext(os.path.basename(filename))[0]
  from tpu_lm.config import checks
  from tpu_lm.sweeps import report, space, study

  config = _CONFIG.value
  checks.validate(config)  # the base config's own mistakes, before any trial
  # The report's parameters are the study's own: --space is for sampling new trials.
  params = [] if _REPORT.value else space.parse(_SPACE.value, config)
  if _TRIALS.value < 1:
    raise UserError(f"--trials={_TRIALS.value}: give a positive number of trials.")
  sweep = study.Sweep(config, params, _DIR.value or os.path.join("workdirs", "sweeps", name), metric=_METRIC.value,
                      direction=_DIRECTION.value, trials=_TRIALS.value, sampler=_SAMPLER.value,
                      pruner=_PRUNER.value, storage=_STORAGE.value, study_name=_STUDY.value or name,
                      seed=_SEED.value)
  direction = sweep.resolved_direction()  # a --metric the task does not produce, before any trial
  if not _REPORT.value:
    print(f"sweep {sweep.study_name}: {sweep.trials} trials of {', '.join(map(str, params))};"
          f" {direction} {sweep.metric}; storage {study.storage_url(sweep)}", flush=True)
    study.run_worker(sweep)
  s = study.open_study(sweep, create=not _REPORT.value)
  written = report.write(s, sweep.directory, sweep.metric, report.fields(s))
  print("results: " + ", ".join(written), flush=True)
  if not _REPORT.value:
    study.check_outcome(s)
