"""Does pretraining on the standard library help on new code, and on a classification task?

Pretrains configs/base.py on the Python standard library (or takes --base=RUN), then
adapts it to a domain it has not seen, available offline: the source of installed
third-party packages (flax, optax, numpy), held out by file. Every row gets the same
small budget (--steps of batch 8 x 256) and the base's tokenizer:

  from scratch      random init, every parameter trained
  full fine-tune    init_from the base, every parameter trained
  frozen lower      init_from the base, embedding and block 0 frozen
  LoRA              init_from the base, rank-8 adapters on every projection

and reports held-out bits per byte, trainable parameters, optimizer-state memory and
wall time. Then the offline classification task (stdlib_functions: which of ten
standard-library packages a function comes from, held out by file), pretrained vs
from scratch: accuracy and macro F1.

  python experiments/transfer/run.py [--base=workdirs/base] [--steps=300]

Every row is the real command (python -m tpu_lm.main --config=configs/finetune.py:BASE
...) in a subprocess. Prints the tables and puts them on top of results.md next to this file (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.transfer.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.transfer.run", *sys.argv[1:]])

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import plots, record  # noqa: E402

PACKAGES = ("flax", "optax", "numpy")


def domain_corpus(directory: str) -> str:
  """A copy of the packages' .py files (text_files reads one directory)."""
  site = sysconfig.get_paths()["purelib"]
  if os.path.isdir(directory):
    return directory
  for package in PACKAGES:
    src = os.path.join(site, package)
    for dirpath, _, files in os.walk(src):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), site)
          os.makedirs(os.path.join(directory, os.path.dirname(rel)), exist_ok=True)
          shutil.copyfile(os.path.join(dirpath, f), os.path.join(directory, rel))
  return directory


def run(name: str, workdir: str, config: str, overrides: dict) -> dict:
  """One row: the main command, timed; its last eval record and the trainable line."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "tpu_lm.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  t0 = time.time()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.time() - t0
  if out.returncode:
    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in records if any(k.startswith("eval_") for k in r)]
  trainable = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\); optimizer state ([\d.,]+) MiB",
                        out.stdout)
  print(f"  {name}: {wall:.0f} s; {evals[-1]}", flush=True)
  return {"name": name, "wall_s": wall, "eval": evals[-1], "trainable": trainable.group(1),
          "total": trainable.group(2), "share": trainable.group(3), "opt_mib": trainable.group(4)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--base", default=os.path.join(ROOT, "workdirs", "base"))
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--work", default=os.path.join(ROOT, "workdirs", "transfer"))
  args = p.parse_args()
  base = os.path.abspath(args.base)
  factor = record.speed_factor()
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    print(f"pretraining the base config into {base} (about 7 minutes on a 2-core CPU)", flush=True)
    subprocess.run([sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={base}"], cwd=ROOT,
                   check=True, capture_output=True)
  corpus = domain_corpus(os.path.join(args.work, "thirdparty_src"))
  finetune = f"configs/finetune.py:{base}"
  common = {"num_train_steps": args.steps, "eval_every_steps": args.steps, "checkpoint_every_steps": args.steps,
            "log_every_steps": 50, "data.dataset": "text_files", "data.path": corpus, "sample.num_prompts": 0}
  lm_rows = [
      ("from scratch", {"init_from": "", "optim.learning_rate": 6e-3}),  # base's rate: best for random init
      ("full fine-tune", {}),
      ("frozen lower (embedding + block 0)", {"optim.freeze": "('embed/.*','layers_0/.*')"}),
      ("LoRA rank 8, every projection", {"lora.rank": 8, "lora.alpha": 16.0, "optim.learning_rate": 3e-3}),
  ]
  print(f"language modelling on {', '.join(PACKAGES)} source, {args.steps} steps each:", flush=True)
  lm = [run(n, os.path.join(args.work, f"lm{i}"), finetune, {**common, **o}) for i, (n, o) in enumerate(lm_rows)]
  cls_common = {**common, "task.kind": "classification", "data.dataset": "stdlib_functions", "data.path": ""}
  cls_rows = [("from scratch", {"init_from": "", "optim.learning_rate": 6e-3}), ("pretrained (full fine-tune)", {})]
  print(f"classification (stdlib_functions, 10 packages), {args.steps} steps each:", flush=True)
  cls = [run(n, os.path.join(args.work, f"cls{i}"), finetune, {**cls_common, **o}) for i, (n, o) in enumerate(cls_rows)]

  base_bpb = _base_bpb(base, corpus)
  lines = [f"Held-out bits per byte on {', '.join(PACKAGES)} source (validation files). The base model before"
           f" any adaptation: {base_bpb:.4f}.", "",
           "| start | bits/byte | trainable parameters | optimizer state | wall time |", "|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['eval']['eval_bpb']:.4f} | {r['trainable']} ({r['share']}%) | {r['opt_mib']} MiB |"
            f" {r['wall_s']:.0f} s |" for r in lm]
  lines += ["", "Classification: which of ten standard-library packages a function comes from (validation: other files).",
            "", "| start | accuracy | macro F1 | wall time |", "|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['eval']['eval_accuracy']:.4f} | {r['eval']['eval_macro_f1']:.4f} | {r['wall_s']:.0f} s |"
            for r in cls]
  record.publish(os.path.join(HERE, "results.md"), "Transfer: pretraining on the standard library, adapting elsewhere",
                 lines, factor, about=f"base {os.path.relpath(base, ROOT)}, {args.steps} steps x 8 x 256 tokens per row")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"lm": lm, "classification": cls, "base_bpb": base_bpb}, f, indent=1)


def _base_bpb(base: str, corpus: str) -> float:
  """The base model on the new domain's validation split, untrained on it (0 steps)."""
  workdir = os.path.join(os.path.dirname(corpus), "base_eval")
  r = run("base, no adaptation", workdir, f"configs/finetune.py:{base}",
          {"num_train_steps": 1, "optim.learning_rate": 0.0, "optim.warmup_steps": 0, "data.dataset": "text_files",
           "data.path": corpus, "sample.num_prompts": 0})
  return r["eval"]["eval_bpb"]


if __name__ == "__main__":
  main()
  plots.transfer()  # the picture next to the table, from the entry just written
