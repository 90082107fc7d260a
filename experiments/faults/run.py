"""Train the base config under repeated random SIGKILLs and SIGTERMs; check nothing changed.

1. An uninterrupted reference run.
2. The same command in another workdir, interrupted again and again: after a random
   delay each attempt gets SIGKILL or SIGTERM (a coin flip), then the command is
   simply started again, as a scheduler would. After the last interruption it runs
   to the end.
3. Checks: every logged training loss (the last record of each step) is bitwise equal
   to the reference's, so are the final eval record and every final parameter.

usage (from the repository root):
  python experiments/faults/run.py [--interruptions 24] [--steps 600] [--config configs/base.py]

--steps shortens the run (both runs use the same value, so the schedule is the same);
checkpoints are written every 50 steps so that a SIGKILL costs little. Puts the checks on
top of results.md beside this script (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.faults.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.faults.run", *sys.argv[1:]])

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from experiments import plots, record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def command(config: str, workdir: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "tpu_lm.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=50",
          "--config.log_every_steps=10", f"--config.eval_every_steps={steps}", "--config.sample.num_prompts=0"]


def last_records(workdir: str) -> dict:
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        by_step[r["step"]] = r["loss"]
  return by_step


def final_params(workdir: str):
  from tpu_lm.inference import run_dir

  run = run_dir.load(workdir)
  return run.step, jax.device_get(run.decoder.params)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/base.py")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--interruptions", type=int, default=24)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=os.path.join(HERE, "runs"))
  args = parser.parse_args()
  rng = random.Random(args.seed)
  ref_dir, faulty_dir = os.path.join(args.workdir, "reference"), os.path.join(args.workdir, "faulty")
  for d in (ref_dir, faulty_dir):
    if os.path.exists(d):
      raise SystemExit(f"{d} exists: delete {args.workdir} to start over.")
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}

  t0 = time.time()
  subprocess.run(command(args.config, ref_dir, args.steps), cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ref_s = time.time() - t0
  print(f"reference run: {ref_s:.0f} s", flush=True)

  kinds, exits = [], []
  t0 = time.time()
  while len(kinds) < args.interruptions:
    proc = subprocess.Popen(command(args.config, faulty_dir, args.steps), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(3, 25)  # covers start-up, compile, training, checkpoint writes
    try:
      proc.wait(timeout=delay)
      break  # finished before this interruption: the run is done
    except subprocess.TimeoutExpired:
      pass
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    proc.send_signal(sig)
    exits.append(proc.wait())
    kinds.append(sig.name)
    print(f"interruption {len(kinds)}: {sig.name} after {delay:.1f} s -> exit {exits[-1]}", flush=True)
  final = subprocess.run(command(args.config, faulty_dir, args.steps), cwd=ROOT, env=env,
                         capture_output=True, text=True)
  assert final.returncode == 0, final.stderr[-2000:]
  faulty_s = time.time() - t0

  ref_losses, faulty_losses = last_records(ref_dir), last_records(faulty_dir)
  losses_equal = ref_losses == faulty_losses
  with open(os.path.join(ref_dir, "metrics.jsonl")) as f:
    ref_eval = [json.loads(line) for line in f][-1]
  with open(os.path.join(faulty_dir, "metrics.jsonl")) as f:
    faulty_eval = [json.loads(line) for line in f][-1]
  (ref_step, ref_params), (faulty_step, faulty_params) = final_params(ref_dir), final_params(faulty_dir)
  params_equal = ref_step == faulty_step and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(faulty_params)))
  sigterm_ok = all(code == 0 for k, code in zip(kinds, exits) if k == "SIGTERM")
  ok = losses_equal and ref_eval == faulty_eval and params_equal and sigterm_ok

  table = "\n".join([
      "| check | result |", "|---|---|",
      f"| interruptions | {len(kinds)} ({kinds.count('SIGKILL')} SIGKILL, {kinds.count('SIGTERM')} SIGTERM) |",
      f"| SIGTERM exits with code 0 | {sigterm_ok} |",
      f"| training losses, all {len(ref_losses)} logged steps, bitwise | {losses_equal} |",
      f"| final eval record | {ref_eval == faulty_eval} ({faulty_eval.get('eval_bpb', float('nan')):.4f} bits/byte) |",
      f"| final parameters (step {faulty_step}), bitwise | {params_equal} |",
      f"| wall time: reference / interrupted | {ref_s:.0f} s / {faulty_s:.0f} s |",
  ])
  record.publish(os.path.join(HERE, "results.md"), "Fault injection: the base config under repeated random kills",
                 [table], record.speed_factor(), about=f"{args.config}, {args.steps} steps, seed {args.seed},"
                 f" {jax.devices()[0].platform}: {'PASS' if ok else 'FAIL'}")
  plots.faults()  # the picture next to the table, from the entry just written
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
