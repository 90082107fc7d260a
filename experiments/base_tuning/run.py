"""Which base config gets the lowest validation bits/byte inside the 5-minute CPU budget?

Runs `configs/base.py` with each variant's overrides (same token budget unless the
variant says otherwise), reads each run's final eval and wall time, prints a
table and puts it on top of results.md beside this file (newest first).

usage (from the repository root):
  python experiments/base_tuning/run.py                 # every variant, one after another
  python experiments/base_tuning/run.py --only b16 base # some of them

Each run takes 5-10 minutes on a 2-core CPU; run nothing else meanwhile, or the wall
times mean nothing (the bits/byte do not depend on speed).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.base_tuning.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.base_tuning.run", *sys.argv[1:]])

import argparse
import json
import os
import re
import subprocess
import sys

from experiments import plots, record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# configs/base.py as it was then (BASELINE undoes the speedrun recipe it took later): the
# Llama block with AdamW and cosine, batch 8 x 2400 steps; the others spend the same
# 4.9M tokens in fewer, larger steps (warmup kept at 5% of the steps), change the
# peak lr, or swap in the GPT-2 block (= configs/gpt2_small.py).
BASELINE = ["--config.optim.optimizer=adamw", "--config.optim.schedule=cosine", "--config.model.zero_init_out=False",
            "--config.num_train_steps=2400", "--config.optim.warmup_steps=120"]
VARIANTS = {
    "base": [],
    "b16": ["--config.data.global_batch_size=16", "--config.num_train_steps=1200",
            "--config.optim.warmup_steps=60", "--config.eval_every_steps=600"],
    "b32": ["--config.data.global_batch_size=32", "--config.num_train_steps=600",
            "--config.optim.warmup_steps=30", "--config.eval_every_steps=300"],
    "b8_lr3e-3": ["--config.optim.learning_rate=3e-3"],
    "gpt2_block": ["--config.model.norm=layernorm", "--config.model.position=learned", "--config.model.mlp=gelu",
                   "--config.model.use_bias=True", "--config.model.num_heads=2", "--config.model.num_kv_heads=0",
                   "--config.model.mlp_dim=640", "--config.model.tie_embeddings=True"],
}


def run(name: str, overrides: list[str]) -> dict:
  workdir = os.path.join(HERE, "runs", name)
  if os.path.exists(workdir):
    raise SystemExit(f"{workdir} exists: delete it to rerun {name} from scratch.")
  # A variant's own flags come after the baseline's: the last value of a field wins.
  cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={workdir}",
         "--config.sample.num_prompts=0", *BASELINE, *overrides]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
  evals = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if "eval_bpb" in l]
  wall = float(re.search(r"total wall time (\d+) s", out.stdout).group(1))
  return {"variant": name, "overrides": " ".join(overrides) or "(none)", "steps": evals[-1]["step"],
          "eval_bpb": evals[-1]["eval_bpb"], "eval_loss": evals[-1]["eval_loss"], "wall_s": wall}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", nargs="*", default=list(VARIANTS))
  args = parser.parse_args()
  factor = record.speed_factor()
  rows = [run(name, VARIANTS[name]) for name in args.only]
  header = "| variant | overrides | steps | eval bits/byte | eval loss | wall time (s) |\n|---|---|---|---|---|---|"
  lines = [f"| {r['variant']} | `{r['overrides']}` | {r['steps']} | {r['eval_bpb']:.4f} | {r['eval_loss']:.4f}"
           f" | {r['wall_s']:.0f} |" for r in rows]
  record.publish(os.path.join(HERE, "results.md"), "Base config tuning (2-core CPU)", [header, *lines], factor,
                 about="the variants of configs/base.py")


if __name__ == "__main__":
  main()
  plots.base_tuning()  # the picture next to the table, from the entry just written
