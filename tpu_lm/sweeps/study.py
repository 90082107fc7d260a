"""One worker of a sweep: trials of a shared Optuna study, each a full training run.

Several workers (processes, hosts) share a study through its storage and each asks
it for the next trial until the study holds `trials` of them; a trial's parameters
come from the sampler (TPE or random), its run directory is
`<sweep>/trials/<study>/NNNN` (its own: trial_dirs.py), its intermediate evals go to
the pruner (which may stop it), and its objective is a named metric of its final eval.

What a trial can end as:
- complete: its objective recorded;
- pruned: stopped early by the pruner (its last eval kept);
- failed: it raised (a bad value for the config, a diverged run); the error is kept
  as the trial's "error" and the sweep goes on;
- interrupted: SIGTERM or Ctrl-C; the training loop saves a checkpoint, the trial is
  put back in the queue with the same parameters, and the worker stops. The next
  worker to start (the same command again) resumes it from that checkpoint.
A worker killed outright (SIGKILL, a lost host) leaves its trial running; with the
SQLite or a database storage a heartbeat notices within a few minutes and the trial
is put back the same way (a journal file has no heartbeat: there it stays running).
Interrupted trials do not count against the budget; failed ones do.
A trial directory that is not the trial's (another study's, or another parameter
set's) stops the worker before that trial trains; the trial goes back in the queue,
as an interrupted one.
"""

import dataclasses
import math
import os
import time
import warnings

from tpu_lm.errors import UserError
from tpu_lm.sweeps import space as space_lib
from tpu_lm.sweeps import trial_dirs

HEARTBEAT_S = 20
GRACE_S = 60
@dataclasses.dataclass
class Sweep:
  config: object  # the base ml_collections config
  params: list  # space.Param
  directory: str
  metric: str = "eval_bpb"
  direction: str = ""  # "minimize" / "maximize"; empty: from the metric's name
  trials: int = 10
  sampler: str = "tpe"
  pruner: str = "median"
  storage: str = ""  # empty: sqlite in the directory
  study_name: str = "sweep"
  seed: int = -1  # < 0: unseeded (each worker of a shared study samples its own points)

  def resolved_direction(self) -> str:
    """--direction, or the metric's own; a metric the config's task does not produce is
    refused here, before any trial."""
    from tpu_lm import tasks

    objective = tasks.from_config(self.config)
    produced = objective.metrics
    if self.metric.startswith("harness/"):  # an lm-evaluation-harness task's metric (config.eval_harness)
      from tpu_lm.harness import benchmarks

      if not self.config.eval_harness.tasks:
        raise UserError(f"--metric={self.metric} is a harness task's metric, but the config runs no harness tasks:"
                        " set --config.eval_harness.tasks.")
      produced = {self.metric: benchmarks.direction(self.metric)}
    if self.metric not in produced:
      raise UserError(f"--metric={self.metric}: a {objective.name} run's final eval has no such metric; use one of"
                      f" {', '.join(produced)}.")
    if self.direction:
      if self.direction not in ("minimize", "maximize"):
        raise UserError(f"--direction={self.direction}: use minimize or maximize.")
      return self.direction
    return produced[self.metric]


def storage_url(sweep: Sweep) -> str:
  return sweep.storage or f"sqlite:///{os.path.abspath(os.path.join(sweep.directory, 'study.db'))}"


def open_storage(url: str):
  """An Optuna storage from a URL: sqlite:///FILE, postgresql://..., mysql://...
  (RDB, with a heartbeat), or journal:FILE (a journal file, e.g. on NFS)."""
  import optuna

  if url.startswith("journal:"):
    from optuna.storages.journal import JournalFileBackend

    path = url.removeprefix("journal:")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))
  for attempt in range(5):
    try:
      with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
          url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
          # SQLite: wait for the other workers' writes rather than fail on a locked file.
          engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as e:  # a wrong URL, a missing database driver, a server that does not answer
      # Workers started together on a new database race to create its tables and
      # version row ("already exists", or an IntegrityError on the row): the loser
      # finds them made and opens the storage on its next try.
      import sqlalchemy.exc

      racing = "already exists" in str(e) or isinstance(e, sqlalchemy.exc.IntegrityError)
      if racing and attempt < 4:
        time.sleep(0.5 * (attempt + 1))
        continue
      raise UserError(f"--storage={url} cannot be opened ({str(e).strip().splitlines()[0][:200]}): give"
                      " sqlite:///FILE, journal:FILE, or a database URL SQLAlchemy can reach.") from None


def open_study(sweep: Sweep, create: bool = True):
  import optuna

  # ERROR: Optuna would log every failed trial with its traceback, and an interrupted or
  # surplus trial is "failed" to it; the worker prints one line for each instead.
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  os.makedirs(sweep.directory, exist_ok=True)
  storage = open_storage(storage_url(sweep))
  if not create:
    try:
      return optuna.load_study(study_name=sweep.study_name, storage=storage)
    except KeyError:
      raise UserError(f"no study {sweep.study_name!r} in {storage_url(sweep)}: run the sweep first.") from None
  samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=None if sweep.seed < 0 else sweep.seed),
              "random": lambda: optuna.samplers.RandomSampler(seed=None if sweep.seed < 0 else sweep.seed)}
  pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
             "hyperband": lambda: optuna.pruners.HyperbandPruner(),
             "none": lambda: optuna.pruners.NopPruner()}
  if sweep.sampler not in samplers:
    raise UserError(f"--sampler={sweep.sampler}: use one of {', '.join(samplers)}.")
  if sweep.pruner not in pruners:
    raise UserError(f"--pruner={sweep.pruner}: use one of {', '.join(pruners)}.")
  direction = sweep.resolved_direction()
  sampler, pruner = samplers[sweep.sampler](), pruners[sweep.pruner]()
  try:  # exclusively: the one worker that makes the study gives it its id
    study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction=direction, sampler=sampler,
                                pruner=pruner)
    study.set_user_attr(trial_dirs.UID, trial_dirs.new_uid())
  except optuna.exceptions.DuplicatedStudyError:
    study = optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=sampler, pruner=pruner)
  if study.direction.name.lower() != direction:
    raise UserError(f"study {sweep.study_name!r} in {storage_url(sweep)} was made to {study.direction.name.lower()}"
                    f" {sweep.metric}, not {direction}: use another --study name or --sweep_dir.")
  return study


_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}


def state_of(t) -> str:
  """A trial's state as the sweep sees it: complete, pruned, failed (an error; these
  three count against the budget), interrupted (Optuna's FAIL without an error: put
  back in the queue), running, waiting, or surplus (asked for past the budget by a
  racing worker, never run)."""
  if t.user_attrs.get("surplus"):
    return "surplus"
  if t.state.name == "FAIL":
    return "failed" if "error" in t.user_attrs else "interrupted"
  return _STATES[t.state.name]


def counts(study) -> dict:
  """Trials per state_of (surplus ones left out)."""
  out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "interrupted": 0}
  for t in study.get_trials(deepcopy=False):
    if (state := state_of(t)) != "surplus":
      out[state] += 1
  return out


def study_uid(study) -> str:
  """The study's own id (trial_dirs.py), read from the storage each time: the worker
  that made the study sets it just after; a study made before ids were kept gets one."""
  for _ in range(50):
    if uid := study.user_attrs.get(trial_dirs.UID):
      return uid
    time.sleep(0.1)
  study.set_user_attr(trial_dirs.UID, trial_dirs.new_uid())
  return study.user_attrs[trial_dirs.UID]


def trial_dir(sweep: Sweep, trial) -> str:
  """The run directory of a trial: its own, or that of the trial it resumes."""
  import optuna

  number = trial.user_attrs.get("resumes")
  if number is None:
    # A trial the heartbeat put back (its worker died) carries the first one's number.
    frozen = trial.study._storage.get_trial(trial._trial_id)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    number = trial.number if retried is None else retried
  return os.path.join(trial_dirs.study_dir(sweep.directory, sweep.study_name), f"{number:04d}")


class _Interrupted(Exception):
  """A trial stopped by SIGTERM / Ctrl-C, its checkpoint saved."""


class _Surplus(Exception):
  """A trial asked for when another worker had just taken the budget's last."""


def _over_budget(study, trial, budget: int) -> bool:
  """Whether the trials numbered before this one already fill the budget (those that
  count, run or wait). Two workers that both saw room for one more trial ask at once:
  Optuna numbers trials atomically, so exactly one of them finds itself surplus."""
  ahead = sum(1 for t in study.get_trials(deepcopy=False)
              if t.number < trial.number and state_of(t) not in ("surplus", "interrupted"))
  return ahead >= budget


def run_worker(sweep: Sweep, train=None) -> dict:
  """Runs trials until the study holds `sweep.trials`; returns the study's counts.

  `train(config, workdir, watch, on_eval) -> result` is the training loop (the
  tests pass their own to count calls).
  """
  import optuna

  from tpu_lm.training import metrics as metrics_lib
  from tpu_lm.training import preemption

  if train is None:
    from tpu_lm.training.loop import train_and_evaluate as train
  study = open_study(sweep)
  trial_dirs.check_all(trial_dirs.study_dir(sweep.directory, sweep.study_name), sweep.study_name, study_uid(study))
  stop = {"reason": None, "refused": None}
  durations = []

  def objective(trial):
    if "resumes" not in trial.user_attrs and _over_budget(study, trial, sweep.trials):
      trial.set_user_attr("surplus", True)
      metrics_lib.console(f"sweep: trial {trial.number} not run: other workers took the study's last trials")
      raise _Surplus()
    try:
      return run_trial(trial)
    except (_Interrupted, optuna.TrialPruned):
      raise
    except Exception as e:  # noqa: BLE001  a trial's crash is recorded with its error; the sweep goes on
      if "error" not in trial.user_attrs:
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        trial.set_user_attr("error", text if isinstance(e, UserError) else f"{type(e).__name__}: {text}")
      metrics_lib.console(f"sweep: trial {trial.number} failed: {trial.user_attrs['error']}")
      raise

  def run_trial(trial):
    values = {p.field: p.suggest(trial) for p in sweep.params}
    workdir = trial_dir(sweep, trial)
    number = int(os.path.basename(workdir))  # the trial whose directory it is (this one, or the one it resumes)
    trial.set_user_attr("workdir", workdir)
    config = space_lib.apply(sweep.config, values)

    def interrupted(reason):
      # Back in the queue with the same parameters and run directory: whoever runs
      # it next resumes there (from the checkpoint just saved, if any).
      stop["reason"] = reason
      study.enqueue_trial(values, user_attrs={"resumes": number})
      return _Interrupted()

    try:
      trial_dirs.claim(workdir, sweep.study_name, study_uid(study), number, values)
    except UserError as e:
      stop["refused"] = e
      raise interrupted("a trial directory another study made") from None
    metrics_lib.console(f"sweep: trial {trial.number} in {workdir}: "
                        + ", ".join(f"{k}={_short(v)}" for k, v in values.items()))

    def on_eval(step, result):
      if sweep.metric not in result:
        return False
      trial.report(float(result[sweep.metric]), step)
      return trial.should_prune()

    try:
      result = train(config, workdir, preemption.Watch(), on_eval)
    except preemption.Stopped as e:  # before training began
      raise interrupted(str(e)) from None
    if "stopped_at" in result:  # a signal during training: saved; resumed by the next worker
      raise interrupted("a stop signal")
    if "stopped_early" in result:
      trial.set_user_attr("stopped_at_step", result["stopped_early"])
      raise optuna.TrialPruned()
    if sweep.metric not in result:
      raise UserError(f"the final eval has no {sweep.metric} (it has"
                      f" {', '.join(k for k in result if k.startswith(('eval_', 'harness/')))}): pass one of those as"
                      " --metric.")
    value = float(result[sweep.metric])
    if not math.isfinite(value):
      raise UserError(f"{sweep.metric} is {value}")
    return value

  while stop["reason"] is None:
    # A dead worker's trial still counts as running until the heartbeat check fails it,
    # which Optuna does only when asked for a trial: without this, a budget filled by
    # it would end the worker before the trial is put back.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(study)
    c = counts(study)
    if c["waiting"] == 0 and c["complete"] + c["pruned"] + c["failed"] + c["running"] >= sweep.trials:
      break
    t0 = time.time()
    study.optimize(objective, n_trials=1, catch=(Exception,))
    durations.append(time.time() - t0)
    _progress(study, sweep, durations)
  if stop["refused"] is not None:
    raise stop["refused"]
  if stop["reason"] is not None:
    metrics_lib.console(f"sweep stopped by {stop['reason']}: the trial in flight was saved and goes back in the"
                        " queue; run the same command again to resume it.")
  return counts(study)


def check_outcome(study) -> None:
  """Refuses (one UserError naming the first error) a study whose every finished trial
  failed, once none runs or waits: its command must not look like a success."""
  c = counts(study)
  if c["failed"] and not (c["complete"] + c["pruned"] + c["running"] + c["waiting"]):
    first = next(t for t in study.get_trials(deepcopy=False) if state_of(t) == "failed")
    error = first.user_attrs["error"].rstrip(".")
    raise UserError(f"all {c['failed']} trials of the sweep failed, the first (trial {first.number}) with"
                    f" \"{error}\": fix that and rerun in a new --sweep_dir or --study.")


def _progress(study, sweep, durations) -> None:
  from tpu_lm.training import metrics as metrics_lib

  c = counts(study)
  done = c["complete"] + c["pruned"] + c["failed"]
  best = ""
  try:
    b = study.best_trial
    best = f"; best {sweep.metric} {b.value:.4f} (trial {b.number})"
  except ValueError:
    pass
  left = max(sweep.trials - done - c["running"], 0)
  eta = metrics_lib.format_seconds(left * sum(durations) / len(durations)) if durations else "?"
  metrics_lib.console(f"sweep: {done}/{sweep.trials} trials done ({c['complete']} complete, {c['pruned']} pruned,"
                      f" {c['failed']} failed; {c['running']} running elsewhere){best}; ETA for this worker {eta}")


def _short(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)
