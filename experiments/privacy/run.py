"""What differential privacy buys and costs: private fine-tuning of the base model on
a corpus with canaries, at epsilon infinity (ordinary fine-tuning), 8, 3 and 1.

usage (from the repository root, after `python -m tpu_lm.main --config=configs/base.py`
has trained workdirs/base; ~20 minutes on 2 cores):
  python experiments/privacy/run.py [--base=workdirs/base] [--steps=300]
  python experiments/privacy/run.py --cost_only   # the step cost again, on an idle machine
  python experiments/privacy/run.py --big_batch   # + epsilon 8 at an expected batch of 82 in 128 rows

The fine-tuning corpus is the installed optax package's Python sources (a dependency,
so every machine has the same files), with four canaries (`password = "<8 hex>"`)
inserted 1, 4, 16 and 64 times (python -m tpu_lm.audit --insert_into). Every run
fine-tunes the same steps at the same expected batch: the private ones Poisson-sample
an expected `EXPECTED` rows a step into a compiled batch of `ROWS` (clip norm 1, noise
calibrated to the epsilon at delta 1e-5); the ordinary one takes fixed batches of
`EXPECTED` rows. Each run is then audited (exposure of each canary among 2000 random
secrets) and evaluated (validation bits/byte of the optax split). The cost of
per-example gradients is measured in process: the compiled step of ROWS rows, ordinary
and private, its time and its XLA temporary memory.

Writes results.md (newest first), results.json and privacy.png beside this file.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.privacy.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.privacy.run", *sys.argv[1:]])

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import record  # noqa: E402

EPSILONS = [float("inf"), 8.0, 3.0, 1.0]
REPEATS = [1, 4, 16, 64]
ROWS, EXPECTED = 32, 12  # 12 of 32: Poisson overflow below 1e-6 a step (the default rule)
DELTA = 1e-5


def corpus(directory: str) -> str:
  import optax

  src = os.path.dirname(optax.__file__)
  shutil.rmtree(directory, ignore_errors=True)
  for path in sorted(glob.glob(os.path.join(src, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, src).replace(os.sep, "__")
    os.makedirs(directory, exist_ok=True)
    shutil.copy(path, os.path.join(directory, rel))
  subprocess.run([sys.executable, "-m", "tpu_lm.audit", f"--insert_into={directory}",
                  f"--repeats={','.join(map(str, REPEATS))}"], cwd=ROOT, check=True)
  return directory.rstrip("/") + "_canaries.json"


def overrides(base: str, data: str, steps: int, eps: float, rows: int = ROWS, expected: int = EXPECTED) -> list[str]:
  flags = [f"--config=configs/finetune.py:{base}", "--config.data.dataset=text_files", f"--config.data.path={data}",
           f"--config.num_train_steps={steps}", f"--config.eval_every_steps={steps}",
           f"--config.checkpoint_every_steps={steps}", f"--config.log_every_steps={max(1, steps // 10)}",
           f"--config.optim.warmup_steps={steps // 10}", "--config.sample.num_prompts=0"]
  if eps == float("inf"):
    return flags + [f"--config.data.global_batch_size={EXPECTED}"]
  return flags + [f"--config.data.global_batch_size={rows}", "--config.privacy.dp=True",
                  f"--config.privacy.target_epsilon={eps}", f"--config.privacy.delta={DELTA}",
                  f"--config.privacy.expected_batch_size={expected}", "--config.privacy.clip_norm=1.0"]


def fine_tune(base, data, steps, eps, name="", rows=ROWS, expected=EXPECTED) -> dict:
  name = name or ("eps_inf" if eps == float("inf") else f"eps_{eps:g}")
  workdir = os.path.join(HERE, "runs", name)
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.time()
  flags = overrides(base, data, steps, eps, rows, expected)
  if name == "before":  # the base model's own numbers on this corpus: one step at learning rate 0
    flags += ["--config.optim.learning_rate=0.0", "--config.optim.warmup_steps=0"]
  out = subprocess.run([sys.executable, "-m", "tpu_lm.main", f"--workdir={workdir}", *flags],
                       cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  noise = next((line.split("noise multiplier ")[1].split()[0] for line in out.stdout.splitlines()
                if line.startswith("DP-SGD:")), "0")
  train = [r for r in records if "step_time_s" in r]
  examples = next((int(line.split()[1].replace(",", "")) for line in out.stdout.splitlines()
                   if line.startswith("DP-SGD:")), None)
  return {"name": name, "epsilon": eps, "expected_batch": expected if eps != float("inf") else EXPECTED,
          "examples": examples, "workdir": workdir, "noise_multiplier": float(noise),
          "eval_bpb": [r for r in records if "eval_bpb" in r][-1]["eval_bpb"],
          "epsilon_logged": train[-1].get("epsilon", float("inf")), "wall_s": time.time() - t0}


def audit(workdir, canaries) -> list[dict]:
  out = os.path.join(workdir, "audit.json")
  subprocess.run([sys.executable, "-m", "tpu_lm.audit", f"--workdir={workdir}", f"--canaries={canaries}",
                  f"--out={out}"], cwd=ROOT, check=True, capture_output=True)
  return json.load(open(out))


def step_cost(base: str, data: str, repeats: int = 10) -> dict:
  """Ordinary vs private compiled step of ROWS rows: seconds a step and XLA temp memory."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from configs import finetune
  from tpu_lm.parallel import mesh as mesh_lib
  from tpu_lm.privacy import gradients
  from tpu_lm.training.setup import Setup

  c = finetune.get_config(base)
  c.data.global_batch_size = ROWS
  out = {}
  for kind in ("ordinary", "private"):
    setup = Setup(c, mesh_lib.make_mesh(mesh_lib.mesh_sizes(c.mesh)))
    if kind == "private":
      setup.use_private_step(1.0, 1.0, EXPECTED)
    rng = jax.numpy.arange(ROWS * c.data.seq_len).reshape(ROWS, -1) % 1000 + 3
    batch = {"inputs": rng, "targets": rng, "segment_ids": rng * 0 + 1,
             "positions": jax.numpy.tile(jax.numpy.arange(c.data.seq_len), (ROWS, 1))}
    if kind == "private":
      batch[gradients.PADDING] = jax.numpy.zeros(ROWS, bool)
    with setup.context():
      state = setup.init(jax.random.key(0))
      batch = setup.device_batch(jax.device_get(batch))
      compiled = setup.train_step.lower(state, batch).compile()
      mem = compiled.memory_analysis()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(repeats):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
    out[kind] = {"step_s": (time.perf_counter() - t0) / repeats, "temp_mb": mem.temp_size_in_bytes / 2**20}
  return out


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
  labels = ["inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:g}"
            + (f"\nbatch {r['expected_batch']}" if r.get("expected_batch", EXPECTED) != EXPECTED else "") for r in rows]
  for k, rep in enumerate(REPEATS):
    axes[0].plot(labels, [r["audit"][k]["exposure_extrapolated"] for r in rows], "o-", label=f"{rep} copies")
  axes[0].set_xlabel("epsilon (delta 1e-5)")
  axes[0].set_ylabel("canary exposure (bits, extrapolated)")
  axes[0].legend(fontsize=8)
  axes[0].grid(alpha=0.3)
  axes[1].plot(labels, [r["eval_bpb"] for r in rows], "o-", color="C3")
  axes[1].set_xlabel("epsilon (delta 1e-5)")
  axes[1].set_ylabel("validation bits/byte (optax)")
  axes[1].grid(alpha=0.3)
  fig.suptitle("Private fine-tuning of workdirs/base: memorization against utility")
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--base", default="workdirs/base")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--cost_only", action="store_true", help="only measure the step cost again")
  parser.add_argument("--big_batch", action="store_true", help="add a private run with a larger batch")
  args = parser.parse_args()
  base = os.path.abspath(args.base)
  if args.cost_only:
    return cost_only(base)
  if args.big_batch:
    return big_batch(base, args.steps)
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    raise SystemExit(f"{base} has no checkpoints: train it first (python -m tpu_lm.main --config=configs/base.py).")
  factor = record.speed_factor()
  data = os.path.join(HERE, "runs", "data")
  canaries = corpus(data)
  cost = step_cost(base, data)
  before = fine_tune(base, data, 1, float("inf"), name="before")
  # Audited through the one-step, learning-rate-0 run: the base's weights, and a config
  # that read the canaries (the audit refuses a run that never trained on them).
  before["audit"] = audit(before["workdir"], canaries)
  rows = []
  for eps in EPSILONS:
    r = fine_tune(base, data, args.steps, eps)
    r["audit"] = audit(r["workdir"], canaries)
    rows.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "audit"}), flush=True)
  saved = {"rows": rows, "before": before, "cost": cost, "factor": factor, "steps": args.steps, "base": base}
  json.dump(saved, open(os.path.join(HERE, "results.json"), "w"), indent=1)
  report(saved)


def report(saved: dict, replace_latest: bool = False) -> None:
  rows, before, cost, factor = saved["rows"], saved["before"], saved["cost"], saved["factor"]
  plot(rows, os.path.join(HERE, "privacy.png"))
  head = "| epsilon | noise multiplier | validation bits/byte | " + " | ".join(
      f"exposure, {n} cop{'y' if n == 1 else 'ies'}" for n in REPEATS) + " |"
  lines = [head, "|---" * (3 + len(REPEATS)) + "|"]
  exp = lambda a: " | ".join(f"{x['exposure_extrapolated']:.1f} ({x['exposure_sampled']:.1f})" for x in a)  # noqa: E731
  lines.append(f"| base, before fine-tuning | - | {before['eval_bpb']:.4f} | {exp(before['audit'])} |")
  for r in rows:
    eps = "inf (ordinary fine-tuning)" if r["epsilon"] == float("inf") else f"{r['epsilon']:g} (logged {r['epsilon_logged']:.3f})"
    if r.get("expected_batch", EXPECTED) != EXPECTED:
      eps += f", expected batch {r['expected_batch']}"
    lines.append(f"| {eps} | {r['noise_multiplier']:.3g} | {r['eval_bpb']:.4f} | {exp(r['audit'])} |")
  o, p = cost["ordinary"], cost["private"]
  lines += ["", "Exposure in bits: extrapolated (skew-normal tail), then by rank among 2000 random secrets (caps at"
            " 11.0); a 32-bit space.",
            f"Cost of per-example gradients, the compiled step of {ROWS} x 256 tokens on this CPU ({cost.get('factor', factor)}):"
            f" ordinary {1000 * o['step_s']:.0f} ms, private {1000 * p['step_s']:.0f} ms ({p['step_s'] / o['step_s']:.2f}x);"
            f" XLA temporary memory {o['temp_mb']:.0f} MB vs {p['temp_mb']:.0f} MB ({p['temp_mb'] / o['temp_mb']:.2f}x).",
            f"{saved['steps']} steps each from {os.path.relpath(saved['base'], ROOT)}; expected batch {EXPECTED} rows"
            f" (private: Poisson into {ROWS}); clip norm 1; lr 6e-4 cosine; delta {DELTA:g}. Plot: privacy.png."]
  path = os.path.join(HERE, "results.md")
  record.publish(path, "Privacy: DP fine-tuning against canary exposure and utility (run.py)", lines, factor,
                 replace_latest=replace_latest)


def big_batch(base: str, steps: int) -> None:
  """One more private run at epsilon 8 with an expected batch of 82 in 128 rows (the
  default rule's), into the latest results: what a larger batch buys back."""
  saved = json.load(open(os.path.join(HERE, "results.json")))
  data = os.path.join(HERE, "runs", "data")
  r = fine_tune(base, data, steps, 8.0, name="eps_8_batch82", rows=128, expected=82)
  r["audit"] = audit(r["workdir"], data.rstrip("/") + "_canaries.json")
  saved["rows"] = [x for x in saved["rows"] if x["name"] != r["name"]] + [r]
  json.dump(saved, open(os.path.join(HERE, "results.json"), "w"), indent=1)
  report(saved, replace_latest=True)


def cost_only(base: str) -> None:
  """Measures the step cost again (on an idle machine) into the latest results."""
  saved = json.load(open(os.path.join(HERE, "results.json")))
  saved["cost"] = step_cost(base, "")
  saved["cost"]["factor"] = record.speed_factor()
  json.dump(saved, open(os.path.join(HERE, "results.json"), "w"), indent=1)
  report(saved, replace_latest=True)


if __name__ == "__main__":
  main()
