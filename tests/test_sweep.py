"""Sweeps: the search space, the worker's bookkeeping (budget, failures, pruning,
interruption and resume) with a stand-in training loop, and two real worker
processes sharing one SQLite study."""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest

from tests.conftest import tiny_config, tiny_flags
from tpu_lm.errors import UserError
from tpu_lm.sweeps import report, space, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_space_parses_every_kind_and_applies_typed_values():
  c = tiny_config()
  params = space.parse(["optim.learning_rate=loguniform(1e-4, 1e-2); model.num_layers=int(1, 3)",
                        "optim.schedule=choice(cosine, linear)", "optim.b2=uniform(0.9, 0.999)",
                        "data.global_batch_size=intlog(4, 32)"], c)
  assert [(p.field, p.kind) for p in params] == [
      ("optim.learning_rate", "loguniform"), ("model.num_layers", "int"), ("optim.schedule", "choice"),
      ("optim.b2", "uniform"), ("data.global_batch_size", "intlog")]
  assert params[2].args == ("cosine", "linear")
  new = space.apply(c, {"optim.learning_rate": 1e-3, "model.num_layers": 3, "optim.b2": 1})
  assert new.model.num_layers == 3 and new.optim.learning_rate == 1e-3 and isinstance(new.optim.b2, float)
  assert c.model.num_layers == 2  # the base config is untouched


@pytest.mark.parametrize("spec, fragment", [
    ("optim.lr=loguniform(1e-4, 1e-2)", "does not have (optim has no 'lr')"),
    ("optim=choice(1, 2)", "a section of the config"),
    ("optim.learning_rate=normal(0, 1)", "unknown kind 'normal'"),
    ("optim.learning_rate=loguniform(0, 1)", "positive low end"),
    ("optim.learning_rate=uniform(2, 1)", "must be below"),
    ("optim.learning_rate=int(1, 3)", "not an integer"),
    ("model.num_layers=uniform(1, 3)", "not a float"),
    ("optim.schedule=choice(1, linear)", "not a str"),
    ("optim.learning_rate", "is not FIELD=KIND(ARGS)"),
    ("optim.b2=uniform(0.9, 0.99); optim.b2=uniform(0.9, 0.95)", "more than once"),
])
def test_space_mistakes_are_one_sentence(spec, fragment):
  with pytest.raises(UserError) as e:
    space.parse([spec], tiny_config())
  assert fragment in str(e.value) and "\n" not in str(e.value)


class FakeTraining:
  """Stands in for the training loop: the objective is a function of the learning rate,
  evals are reported at steps 1 and 2, and chosen calls fail or are interrupted."""

  def __init__(self, fail_on=(), interrupt_on=()):
    self.calls, self.fail_on, self.interrupt_on = [], set(fail_on), set(interrupt_on)

  def __call__(self, config, workdir, watch, on_eval):
    watch.close()
    call = len(self.calls)
    self.calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "runs.txt"), "a") as f:
      f.write(f"{call}\n")
    if call in self.fail_on:
      raise UserError("optim.learning_rate is too large: lower it.")
    if call in self.interrupt_on:
      return {"stopped_at": 1}
    value = abs(config.optim.learning_rate - 3e-3) * 100 + 1.0
    for step in (1, 2):
      if on_eval(step, {"eval_bpb": value}):
        return {"eval_bpb": value, "stopped_early": step}
    return {"eval_bpb": value}


def _sweep(tmp_path, **kw):
  c = tiny_config()
  return study.Sweep(c, space.parse(["optim.learning_rate=loguniform(1e-4, 1e-2)"], c), str(tmp_path / "sweep"),
                     study_name="t", seed=0, **kw)


def test_worker_keeps_the_budget_records_failures_and_writes_the_report(tmp_path):
  sweep = _sweep(tmp_path, trials=5, pruner="none")
  train = FakeTraining(fail_on={1})
  c = study.run_worker(sweep, train)
  assert c["complete"] == 4 and c["failed"] == 1 and len(train.calls) == 5
  assert len(set(train.calls)) == 5  # one run directory per trial
  s = study.open_study(sweep)
  failed = [t for t in s.get_trials() if t.state.name == "FAIL"]
  assert failed[0].user_attrs["error"] == "optim.learning_rate is too large: lower it."
  # Running the worker again on a finished study runs nothing.
  assert study.run_worker(sweep, train)["complete"] == 4 and len(train.calls) == 5
  written = report.write(s, sweep.directory, "eval_bpb", ["optim.learning_rate"])
  assert all(os.path.getsize(p) > 0 for p in written) and any(p.endswith(".png") for p in written)
  table = list(csv.DictReader(open(os.path.join(sweep.directory, "results.csv"))))
  assert [r["state"] for r in table].count("failed") == 1 and len(table) == 5
  best = min(float(r["value"]) for r in table if r["state"] == "complete")
  assert f"{best:.4g}" in open(os.path.join(sweep.directory, "results.md")).read()


def test_an_interrupted_trial_is_resumed_in_its_own_directory(tmp_path):
  sweep = _sweep(tmp_path, trials=3, pruner="none")
  train = FakeTraining(interrupt_on={1})
  first = study.run_worker(sweep, train)
  assert first["complete"] == 1 and first["interrupted"] == 1 and first["waiting"] == 1 and len(train.calls) == 2
  second = study.run_worker(sweep, train)  # "run the same command again"
  assert second["complete"] == 3 and second["waiting"] == 0
  assert train.calls[2] == train.calls[1]  # the resumed trial ran in the interrupted one's directory
  s = study.open_study(sweep)
  resumed = [t for t in s.get_trials() if "resumes" in t.user_attrs][0]
  interrupted = [t for t in s.get_trials() if t.state.name == "FAIL"][0]
  assert resumed.params == interrupted.params and resumed.user_attrs["resumes"] == interrupted.number


def test_the_pruner_stops_trials_worse_than_the_median(tmp_path):
  sweep = _sweep(tmp_path, trials=8, pruner="median")
  study.run_worker(sweep, FakeTraining())
  s = study.open_study(sweep)
  pruned = [t for t in s.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
  complete = [t for t in s.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
  assert pruned and all(t.user_attrs["stopped_at_step"] == 1 for t in pruned)
  # MedianPruner: pruned at step 1 only when worse than the median of the trials completed before.
  for t in pruned:
    earlier = [u.intermediate_values[1] for u in complete if u.number < t.number]
    assert t.intermediate_values[1] > np.median(earlier)
  assert len(pruned) + len(complete) == 8


def test_metric_and_storage_mistakes_are_one_sentence(tmp_path):
  with pytest.raises(UserError, match="cannot be opened"):
    study.open_study(_sweep(tmp_path, storage="nosuchdb://x"))
  # A metric the task does not produce: refused before any trial, with the valid ones listed.
  for direction in ("", "minimize"):
    train = FakeTraining()
    with pytest.raises(UserError) as e:
      study.run_worker(_sweep(tmp_path, trials=2, metric="eval_bpd", direction=direction), train)
    assert str(e.value) == ("--metric=eval_bpd: a lm run's final eval has no such metric; use one of eval_loss,"
                            " eval_ppl, eval_bpb.") and not train.calls
  classifier = _sweep(tmp_path, metric="eval_bpb")
  with classifier.config.unlocked():
    classifier.config.task.kind = "classification"
  with pytest.raises(UserError, match="eval_loss, eval_accuracy, eval_macro_f1, eval_macro_precision, eval_macro_rec"):
    classifier.resolved_direction()
  classifier.metric = "eval_macro_f1"
  assert classifier.resolved_direction() == "maximize"


def test_a_sweep_whose_trials_all_failed_is_an_error_naming_the_first(tmp_path):
  sweep = _sweep(tmp_path, trials=3, pruner="none")
  study.run_worker(sweep, FakeTraining(fail_on={0, 1, 2}))
  with pytest.raises(UserError) as e:
    study.check_outcome(study.open_study(sweep))
  assert str(e.value).startswith('all 3 trials of the sweep failed, the first (trial 0) with "optim.learning_rate is'
                                 ' too large: lower it": fix that')
  # One trial that completes is a result: the others' failures are in the report.
  other = _sweep(tmp_path, trials=3, pruner="none")
  other.study_name = "u"
  study.run_worker(other, FakeTraining(fail_on={0, 1}))
  study.check_outcome(study.open_study(other))


def _runs(workdir) -> list[str]:
  """The FakeTraining calls made in a run directory."""
  return open(os.path.join(workdir, "runs.txt")).read().split()


def test_a_second_study_never_trains_in_the_first_ones_directories(tmp_path):
  first = _sweep(tmp_path, trials=2, pruner="none")
  train = FakeTraining(interrupt_on={1})  # leaves a trial to resume in the first study
  study.run_worker(first, train)
  first_dirs = set(train.calls)
  # Another study in the same sweep directory: its own directories, every run from scratch.
  other = _sweep(tmp_path, trials=3, pruner="none")
  other.study_name = "u"
  train = FakeTraining()
  assert study.run_worker(other, train)["complete"] == 3
  assert not first_dirs & set(train.calls) and all(_runs(d) == [str(i)] for i, d in enumerate(train.calls))
  # The first study's database deleted and the sweep run again: a new study of the same
  # name, refused before any trial, in one sentence naming the directory and the fix.
  os.remove(os.path.join(first.directory, "study.db"))
  train = FakeTraining()
  with pytest.raises(UserError) as e:
    study.run_worker(first, train)
  d = os.path.join(first.directory, "trials", "t", "0000")
  assert str(e.value) == (f"trial directory {d} belongs to an earlier study of the same name (its database was"
                          " recreated, or another storage holds it), not to study 't': use another --sweep_dir or"
                          f" --study, or delete {d}.")
  assert not train.calls


def test_a_directory_that_is_not_the_trials_stops_the_worker_before_it_trains(tmp_path):
  sweep = _sweep(tmp_path, trials=3, pruner="none")
  marker = os.path.join(sweep.directory, "trials", "t", "0001", "sweep_trial.json")

  class Intruder(FakeTraining):
    """While trial 0 trains, another process claims trial 1's directory for other values."""

    def __call__(self, config, workdir, watch, on_eval):
      if not self.calls:
        uid = study.study_uid(study.open_study(sweep))
        os.makedirs(os.path.dirname(marker))
        json.dump({"study": "t", "study_uid": uid, "trial": 1, "params": {"optim.learning_rate": 0.5}},
                  open(marker, "w"))
      return super().__call__(config, workdir, watch, on_eval)

  train = Intruder()
  with pytest.raises(UserError, match=r"trial directory .*0001 holds trial 1 with \{'optim.learning_rate': 0.5\}, not"
                     r" trial 1 with .*: use another --sweep_dir or --study, or delete .*0001\.$"):
    study.run_worker(sweep, train)
  assert len(train.calls) == 1  # trial 1 never trained; it waits in the queue for its own directory
  c = study.counts(study.open_study(sweep))
  assert c["complete"] == 1 and c["interrupted"] == 1 and c["waiting"] == 1
  os.remove(marker)
  assert study.run_worker(sweep, train)["complete"] == 3 and train.calls[1] == os.path.dirname(marker)
  # A directory with files but no marker is not a trial's either.
  stray = os.path.join(sweep.directory, "trials", "t", "0007")
  os.makedirs(stray)
  open(os.path.join(stray, "notes.txt"), "w").close()
  with pytest.raises(UserError, match="holds files but no sweep_trial.json"):
    study.run_worker(sweep, train)


class Killed(BaseException):
  """A worker killed outright: nothing records the trial's end."""


def test_a_trial_whose_worker_died_is_retried_in_its_own_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(study, "HEARTBEAT_S", 1)
  monkeypatch.setattr(study, "GRACE_S", 1)
  sweep = _sweep(tmp_path, trials=2, pruner="none")

  class Dies(FakeTraining):
    def __call__(self, config, workdir, watch, on_eval):
      out = super().__call__(config, workdir, watch, on_eval)
      if len(self.calls) == 2:
        raise Killed()
      return out

  train = Dies()
  with pytest.raises(Killed):
    study.run_worker(sweep, train)
  time.sleep(3)  # the heartbeat goes stale; the next worker requeues the trial
  c = study.run_worker(sweep, train)
  assert c["complete"] == 2 and c["interrupted"] == 1
  assert train.calls[2] == train.calls[1] and _runs(train.calls[1]) == ["1", "2"]
  retried = [t for t in study.open_study(sweep).get_trials() if "failed_trial" in t.system_attrs]
  assert len(retried) == 1 and retried[0].state.name == "COMPLETE"


@pytest.mark.slow
def test_two_worker_processes_share_one_study(corpus_dir, data_dir, tmp_path):
  """Two real `python -m tpu_lm.sweep` processes on one SQLite study: every trial runs
  exactly once, in its own run directory, and the study ends with the budget."""
  sweep_dir = tmp_path / "sweep"
  flags = [f for f in tiny_flags(corpus_dir, data_dir, "unused") if not f.startswith("--workdir")]
  cmd = [sys.executable, "-m", "tpu_lm.sweep", *flags, "--config.sample.num_prompts=0", "--trials=4",
         "--space=optim.learning_rate=loguniform(1e-3, 1e-2)", f"--sweep_dir={sweep_dir}", "--pruner=none"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  workers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
  outs = [w.communicate(timeout=600)[0] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], outs
  s = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir}/study.db")
  ran = [t for t in s.get_trials() if not t.user_attrs.get("surplus")]
  assert len(ran) == 4 and all(t.state.name == "COMPLETE" for t in ran)
  dirs = sorted(t.user_attrs["workdir"] for t in ran)
  assert len(set(dirs)) == 4
  for d in dirs:  # each trial trained once, from step 0 to the end (a second run would repeat steps)
    steps = [json.loads(line)["step"] for line in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 6
  assert all("trial" in o for o in outs)  # both workers took part
  assert os.path.exists(sweep_dir / "results.csv") and os.path.exists(sweep_dir / "objective_by_param.png")


def test_the_command_fails_when_every_trial_failed_and_reports_without_space(tmp_path):
  """The CLI: a sweep whose trials all failed exits 2 with the first error (its report
  written); --report_only takes the parameters from the study, without --space."""
  sweep_dir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "tpu_lm.sweep", "--config=configs/tiny.py", f"--sweep_dir={sweep_dir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

  def run(*flags):
    return subprocess.run(cmd + list(flags), cwd=ROOT, env=env, capture_output=True, text=True)

  out = run("--trials=2", "--space=model.num_heads=choice(3, 5)", "--pruner=none")
  assert out.returncode == 2, out.stdout + out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: all 2 trials of the sweep failed, the first (trial 0) with "config field'
                         ' model.num_heads is')
  assert last.endswith('": fix that and rerun in a new --sweep_dir or --study.')
  assert os.path.exists(sweep_dir / "results.csv")
  out = run("--report_only")
  assert out.returncode == 0, out.stderr
  table = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert len(table) == 2 and all(r["state"] == "failed" and r["model.num_heads"] in ("3", "5") for r in table)
