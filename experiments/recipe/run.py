"""The speedrun's techniques on the base config: each alone, then together, at the same
wall-clock budget at the reference CPU speed, two seeds each.

"base" here is configs/base.py as it was before it took the winners (BASELINE below undoes
them): the Llama block with AdamW and cosine. The budget is its own: its 2400 steps
(times --budget_scale), converted
into each variant's steps by its measured train-step time. A variant whose step costs
more (Muon's Newton-Schulz iterations) gets fewer steps; one that costs less, more. The
step times are measured first, in this process, one variant at a time on the same
synthetic batch; the training runs then last a fixed number of steps, so their
results do not depend on what else the machine does (--jobs 2 runs two at once).

usage (from the repository root):
  python -m experiments.recipe.run                                  # every variant, 2 seeds
  python -m experiments.recipe.run --budget_scale 0.25 --jobs 2      # a quarter of the budget
  python -m experiments.recipe.run --only base --combine muon+relu2+zero_init+wsd muon+zero_init+wsd
  python -m experiments.recipe.run --only base --combine muon+zero_init+wsd+decay_0.4   # a TUNING setting

Results go on top of results.md beside this file; recipe.png (recipe_SCALE.png for a
--budget_scale other than 1) plots each run's training loss against reference seconds
(seed 0).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as a module
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.recipe.run", *sys.argv[1:]])

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from experiments import record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE_STEPS, BASE_WARMUP = 2400, 120  # the defaults' (configs/base.py before it took the recipe)
# Every variant starts from configs/base.py with its recipe undone: the Llama block with
# AdamW and cosine, the base these techniques were measured against.
BASELINE = {"optim.optimizer": "adamw", "optim.schedule": "cosine", "model.zero_init_out": False}

# Each technique alone, on configs/base.py. ReLU² is not gated: its MLP width 624 keeps
# SwiGLU's 3 x 160 x 416 parameters in 2 matrices.
VARIANTS = {
    "base": {},
    "muon": {"optim.optimizer": "muon"},
    "wsd": {"optim.schedule": "wsd"},
    "qk_norm": {"model.qk_norm": True},
    "softcap": {"model.logit_softcap": 30.0},
    "relu2": {"model.mlp": "relu2", "model.mlp_dim": 624},
    "zero_init": {"model.zero_init_out": True},
    "z_loss": {"optim.z_loss": 1e-4},
    "schedule_free": {"optim.optimizer": "schedule_free_adamw", "optim.schedule": "constant"},
}
# Settings of the winners, for --combine only (alone on the AdamW base they mean nothing):
# Muon at twice its default rate (the speedrun's is 0.05), and longer cool-downs (the
# speedrun's decay covers the last 40% of the steps and more).
TUNING = {
    "muon_lr_0.04": {"optim.muon_learning_rate": 0.04},
    "decay_0.4": {"optim.decay_fraction": 0.4},
    "decay_0.6": {"optim.decay_fraction": 0.6},
    "decay_0.8": {"optim.decay_fraction": 0.8},
}
# Variants whose train step is the base's arithmetic (a schedule, an initialisation, a
# rate): they get the base's steps, not a timing's noise (about 4% between processes here).
SAME_STEP = ("wsd", "zero_init", *TUNING)


def config_for(overrides: dict):
  from configs import base
  from tpu_lm.sweeps import space

  return space.apply(base.get_config(), {**BASELINE, **overrides})


def step_seconds(overrides: dict, rounds: int = 5, repeats: int = 10) -> float:
  """Seconds per train step of the base shapes with `overrides`, on this machine's CPU:
  the fastest of `rounds` rounds (the least disturbed by anything else running)."""
  import jax
  import numpy as np

  from tpu_lm.parallel import mesh as mesh_lib
  from tpu_lm.training.setup import Setup

  config = config_for(overrides)  # SentencePiece 2048: its size is all Setup reads; none is trained
  b, t = config.data.global_batch_size, config.data.seq_len
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.data.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
  with setup.context():
    state = setup.init(jax.random.key(0))
    batch = setup.device_batch(batch)
    for _ in range(3):  # compile and warm
      state, m = setup.train_step(state, batch)
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(rounds):
      start = time.perf_counter()
      for _ in range(repeats):
        state, m = setup.train_step(state, batch)
      jax.block_until_ready(m)
      best = min(best, (time.perf_counter() - start) / repeats)
  return best


def step_seconds_alone(overrides: dict) -> float:
  """step_seconds in a fresh process: timed in one process one after another, later
  variants ran a few percent slower than the same arithmetic timed first."""
  out = subprocess.run([sys.executable, "-m", "experiments.recipe.run", "--time", json.dumps(overrides)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise SystemExit(f"timing {overrides} failed:\n{out.stderr[-3000:]}")
  return float(out.stdout.strip().splitlines()[-1])


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def train(name: str, overrides: dict, steps: int, seed: int) -> dict:
  """One run of `steps` steps (warmup 5% of them, evaluated once at the end); reuses a
  finished run directory of the same variant, steps and seed."""
  workdir = os.path.join(HERE, "runs", f"{name}_{steps}_s{seed}")
  metrics = os.path.join(workdir, "metrics.jsonl")
  wanted = {"num_train_steps": steps, "optim.warmup_steps": round(BASE_WARMUP * steps / BASE_STEPS),
            "eval_every_steps": steps, "checkpoint_every_steps": steps, "log_every_steps": max(steps // 24, 1),
            "seed": seed, "sample.num_prompts": 0, **BASELINE, **overrides}
  if not os.path.exists(metrics) or not any("eval_bpb" in line for line in open(metrics)):
    cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={workdir}",
           *flags(wanted)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"{name} seed {seed} failed:\n{out.stderr[-3000:]}")
  records = [json.loads(line) for line in open(metrics)]
  final = [r for r in records if "eval_bpb" in r][-1]
  curve = [(r["step"], r["loss"]) for r in records if "loss" in r and "eval_bpb" not in r]
  return {"name": name, "seed": seed, "steps": final["step"], "eval_bpb": final["eval_bpb"], "curve": curve}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", nargs="*", default=list(VARIANTS))
  parser.add_argument("--combine", nargs="*", default=[], help="A+B+...: one more variant of these variants'"
                      " overrides together (several may be given)")
  parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
  parser.add_argument("--budget_scale", type=float, default=1.0, help="the base's 2400 steps times this")
  parser.add_argument("--jobs", type=int, default=1, help="training runs at once (step counts are fixed first)")
  parser.add_argument("--step_ms", nargs="*", default=[], help="NAME=MS: a step time measured before (a quiet"
                      " machine's, when this one is busy), instead of timing NAME now")
  parser.add_argument("--time", help=argparse.SUPPRESS)  # JSON overrides: print their step time (a child process)
  args = parser.parse_args()
  if args.time is not None:
    print(step_seconds(json.loads(args.time)))
    return
  variants = {name: VARIANTS[name] for name in args.only}
  for combined in args.combine:
    variants[combined] = {k: v for name in combined.split("+") for k, v in (VARIANTS | TUNING)[name].items()}
  factor_text = record.speed_factor()
  factor = float(factor_text.split()[-1]) if factor_text[-1].isdigit() else float("nan")
  given = {name: float(ms) / 1e3 for name, ms in (kv.split("=") for kv in args.step_ms)}
  seconds = {"base": given.get("base") or step_seconds_alone({})}
  for name, o in variants.items():
    same = name in SAME_STEP or (name in args.combine and all(n in SAME_STEP for n in name.split("+")))
    seconds[name] = seconds["base"] if same or name == "base" else given.get(name) or step_seconds_alone(o)
  budget_steps = round(BASE_STEPS * args.budget_scale)
  steps = {name: round(budget_steps * seconds["base"] / seconds[name]) for name in variants}
  print({n: f"{1e3 * s:.1f} ms/step, {steps.get(n, budget_steps)} steps" for n, s in seconds.items()}, flush=True)
  jobs = [(n, s) for s in args.seeds for n in variants]
  # The first run builds the dataset and tokenizer that the others then share.
  results = [train(*jobs[0][:1], variants[jobs[0][0]], steps[jobs[0][0]], jobs[0][1])]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    results += list(pool.map(lambda job: train(job[0], variants[job[0]], steps[job[0]], job[1]), jobs[1:]))
  by = {(r["name"], r["seed"]): r for r in results}
  mean = {n: sum(by[n, s]["eval_bpb"] for s in args.seeds) / len(args.seeds) for n in variants}
  ref = mean.get("base")
  budget_ref_s = budget_steps * seconds["base"] * factor
  lines = [f"Budget: the base's {budget_steps} steps at its step time, {budget_ref_s:.0f} s of training at the"
           " reference speed (compile, data and eval on top, as in the base's own 255 s)."
           " Bits/byte on the whole held-out split after the last step.", "",
           "| variant | overrides | ms/step here | steps in budget | " +
           " | ".join(f"bits/byte seed {s}" for s in args.seeds) + " | mean | vs base |",
           "|---|---|---|---|" + "---|" * len(args.seeds) + "---|---|"]
  for n, o in variants.items():
    vs = f"{mean[n] - ref:+.4f}" if ref is not None else "n/a"
    over = ", ".join(f"{k}={v}" for k, v in o.items()) or "(none)"
    lines.append(f"| {n} | `{over}` | {1e3 * seconds[n]:.1f} | {steps[n]} | " +
                 " | ".join(f"{by[n, s]['eval_bpb']:.4f}" for s in args.seeds) + f" | {mean[n]:.4f} | {vs} |")
  record.publish(os.path.join(HERE, "results.md"), "The speedrun's techniques on the base config (2-core CPU)",
                 lines, factor_text, about=f"budget scale {args.budget_scale}")
  plot(results, seconds, factor, args.seeds[0], "recipe.png" if args.budget_scale == 1 else
       f"recipe_{args.budget_scale:g}.png")


def plot(results, seconds, factor, seed, name) -> None:
  from experiments import plots

  plt = plots._pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
  for r in (r for r in results if r["seed"] == seed):
    xs = [step * seconds[r["name"]] * factor for step, _ in r["curve"]]
    ax.plot(xs, [loss / 0.6931 for _, loss in r["curve"]], label=f"{r['name']} ({r['eval_bpb']:.4f} bits/byte)")
  ax.set_xlabel("training time at the reference CPU speed (s)")
  ax.set_ylabel("training loss (bits/token, window mean)")
  ax.set_title(f"The speedrun's techniques on the base config (seed {seed})", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots._save(fig, "recipe", name)


if __name__ == "__main__":
  main()
