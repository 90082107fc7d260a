"""A small hyperparameter sweep end to end: the sweep command on configs/tiny.py, its table
and plots kept here.

Runs, from the repository root, a fresh study of `python -m tpu_lm.sweep` (Optuna TPE,
median pruner at the intermediate evals; tpu_lm/cli/sweep.py) into runs/ beside this
file (ignored), with the space below unless --space says otherwise:

  python experiments/sweep/run.py [--trials 8] [--seed 0] [--config configs/tiny.py] [--space SPACE]

About 4-5 minutes on a 2-core CPU at 8 trials (pruned trials stop at their step-50
eval). Puts the sweep's best trial and table on top of results.md (newest first) and
copies its results.csv, objective_per_trial.png and objective_by_param.png beside it.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.sweep.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.sweep.run", *sys.argv[1:]])

import argparse
import os
import shutil
import subprocess
import sys
import time

from experiments import record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPACE = "optim.learning_rate=loguniform(1e-4, 3e-2); model.num_layers=int(1, 3)"
COPIED = ("results.csv", "objective_per_trial.png", "objective_by_param.png")


def sweep(config: str, trials: int, seed: int, space: str, sweep_dir: str) -> float:
  """Runs the sweep command in a fresh directory; returns its wall time in seconds."""
  shutil.rmtree(sweep_dir, ignore_errors=True)  # a fresh study, not the previous one resumed
  cmd = [sys.executable, "-m", "tpu_lm.sweep", f"--config={config}", f"--trials={trials}", f"--seed={seed}",
         f"--space={space}", f"--sweep_dir={sweep_dir}", "--config.sample.num_prompts=0"]
  t0 = time.time()
  out = subprocess.run(cmd, cwd=ROOT, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
  if out.returncode:
    raise SystemExit(f"the sweep failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
  return time.time() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--trials", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--space", default=SPACE)
  args = p.parse_args()
  factor = record.speed_factor()
  sweep_dir = os.path.join(HERE, "runs", "sweep")
  seconds = sweep(args.config, args.trials, args.seed, args.space, sweep_dir)
  report = open(os.path.join(sweep_dir, "results.md")).read().splitlines()
  for name in COPIED:
    shutil.copy(os.path.join(sweep_dir, name), os.path.join(HERE, name))
  lines = [*report[2:], "", f"The sweep command: `python -m tpu_lm.sweep --config={args.config} --trials={args.trials}"
           f" --seed={args.seed} --space='{args.space}' --config.sample.num_prompts=0`, {seconds // 60:.0f} min"
           f" {seconds % 60:.0f} s. Plots: objective_per_trial.png, objective_by_param.png; every trial: results.csv."]
  record.publish(os.path.join(HERE, "results.md"), "A hyperparameter sweep of configs/tiny.py (python -m tpu_lm.sweep)",
                 lines, factor, about=f"{report[0].lstrip('# ')}, {args.trials} trials")


if __name__ == "__main__":
  main()
