"""lm-evaluation-harness on a tpu_lm run: tpu_lm's own harness model against lm-eval's
`hf` backend (transformers, what a user would pick instead) on the same run exported
with --to_hf, the same tasks, on the same machine, in one run.

Trains configs/gpt2_small.py for --steps steps (or reuses --workdir), exports it, and
writes three local tasks from the validation split of its corpus (the Python standard
library files the run never trained on):
  next_line      multiple_choice: which of 4 lines follows 3 lines of a file (acc)
  file_ppl       loglikelihood_rolling: whole files (bits per byte)
  complete_line  generate_until "\\n": the line after 3 lines, greedy (exact_match)
Each task runs through both backends with the same batch size; tpu_lm twice (the
first pays its compilations, the second is the steady state). Prints a table with the
seconds and the ratio, the metrics, and how closely the two agree (every request's
log-likelihood; identical generations), and puts it on top of results.md.

usage: python -m experiments.harness.run [--steps 600] [--workdir RUN] [--docs 100] [--batch 16]
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.harness.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.harness.run", *sys.argv[1:]])

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks are local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments import record  # noqa: E402
from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()
import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADER = "lm-evaluation-harness: tpu_lm's model against lm-eval's hf backend on the exported run (experiments/harness)"
TASKS = {
    "next_line": ("output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                  "doc_to_target: \"{{gold}}\"\ntarget_delimiter: \"\\n\"\nmetric_list:\n  - metric: acc\n"),
    "file_ppl": ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                 "metric_list:\n  - metric: bits_per_byte\n"),
    "complete_line": ("output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
                      "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 32\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"),
}
METRIC = {"next_line": "acc,none", "file_ppl": "bits_per_byte,none", "complete_line": "exact_match,none"}


def train(steps: int, workdir: str) -> None:
  cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/gpt2_small.py", f"--workdir={workdir}",
         f"--config.num_train_steps={steps}", f"--config.eval_every_steps={steps}",
         f"--config.checkpoint_every_steps={steps}", "--config.optim.warmup_steps=100"]
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def write_tasks(run, directory: str, docs: int, seed: int = 0) -> None:
  """The three tasks from the run's validation split (held out from its training)."""
  from tpu_lm.data import sources
  from tpu_lm.harness.benchmarks import write_local_task

  rng = random.Random(seed)
  splits = sources.open_splits(run.config.data)
  texts = []
  for d in splits.validation.get(range(len(splits.validation))):
    t = d["text"]
    texts.append(t.decode("utf-8", "replace") if isinstance(t, bytes) else t)
  lines = [[l for l in t.splitlines() if l.strip()] for t in texts]
  pool = [l for ls in lines for l in ls if 8 <= len(l) <= 80]
  windows = [(ls, i) for ls in lines for i in range(3, len(ls)) if 8 <= len(ls[i]) <= 80]
  rng.shuffle(windows)
  rows = {"next_line": [], "complete_line": [], "file_ppl": []}
  for ls, i in windows[:docs]:
    choices = [ls[i]] + rng.sample([l for l in pool if l != ls[i]], 3)
    rng.shuffle(choices)
    rows["next_line"].append({"context": "\n".join(ls[i - 3:i]), "choices": choices, "gold": choices.index(ls[i])})
  for ls, i in windows[docs:2 * docs]:
    rows["complete_line"].append({"context": "\n".join(ls[i - 3:i]) + "\n", "target": ls[i]})
  short = [t for t in texts if 200 <= len(t) <= 4000]
  rng.shuffle(short)
  rows["file_ppl"] = [{"text": t} for t in short[:max(docs // 4, 1)]]
  for name, kind in TASKS.items():
    write_local_task(directory, name, rows[name], kind)


def timed(lm, task: str, manager) -> tuple[float, dict]:
  import lm_eval

  t0 = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0)
  return time.perf_counter() - t0, out


def responses(results: dict, task: str) -> list:
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def agreement(task: str, ours: dict, theirs: dict) -> str:
  a, b = responses(ours, task), responses(theirs, task)
  if task == "complete_line":
    same = np.mean([x[0][0] == y[0][0] for x, y in zip(a, b)])
    return f"{same:.0%} identical generations"
  flat = lambda rs: np.array([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for doc in rs for r in doc])  # noqa: E731
  return f"max abs difference of a log-likelihood {np.abs(flat(a) - flat(b)).max():.1e}"


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--workdir", default="", help="reuse this GPT-2-block run instead of training one")
  p.add_argument("--docs", type=int, default=100)
  p.add_argument("--batch", type=int, default=16)
  args = p.parse_args()
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager

  from tpu_lm.harness.model import TpuLM
  from tpu_lm.inference import run_dir
  from tpu_lm.interop import hf

  factor = record.speed_factor()
  tmp = tempfile.mkdtemp(prefix="harness_experiment_")
  workdir = args.workdir or os.path.join(tmp, "run")
  if not args.workdir:
    train(args.steps, workdir)
  run = run_dir.load(workdir)
  hf.export_model(workdir, os.path.join(tmp, "hf"))
  task_dir = os.path.join(tmp, "tasks")
  os.makedirs(task_dir)
  write_tasks(run, task_dir, args.docs)
  manager = TaskManager(include_path=task_dir, include_defaults=False)
  ours = TpuLM(run, batch_size=args.batch, max_batch=args.batch)
  hf_args = f"pretrained={tmp}/hf,dtype=float32,device=cpu,batch_size={args.batch}"
  rows = []
  for task in TASKS:
    # hf reads text as a tpu_lm run does with add_bos_token; its rolling windows would then
    # score a second BOS, so file_ppl runs without it (the first token is given BOS either way).
    theirs_lm = get_model("hf").create_from_arg_string(f"{hf_args},add_bos_token={task != 'file_ppl'}")
    cold, _ = timed(ours, task, manager)
    warm, mine = timed(ours, task, manager)
    peer, theirs = timed(theirs_lm, task, manager)
    n = sum(len(s["resps"]) for s in mine["samples"][task])
    rows.append((task, n, cold, warm, peer, mine["results"][task][METRIC[task]], theirs["results"][task][METRIC[task]],
                 agreement(task, mine, theirs)))
    del theirs_lm
  lines = [f"A GPT-2-block run ({sum(x.size for x in jax.tree.leaves(run.decoder.params)):,} parameters, "
           f"{'trained ' + str(args.steps) + ' steps of configs/gpt2_small.py' if not args.workdir else workdir},"
           f" step {run.step}), batch {args.batch}, on {jax.device_count()} {jax.devices()[0].platform} device(s);"
           " lm-eval's hf backend on its --to_hf export, float32 on the CPU (torch"
           f" {__import__('torch').__version__}, {__import__('torch').get_num_threads()} threads).", "",
           "| task | requests | tpu_lm cold s | tpu_lm warm s | transformers (hf) s | hf / tpu_lm warm |"
           " tpu_lm metric | hf metric | agreement |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for task, n, cold, warm, peer, m1, m2, agree in rows:
    lines.append(f"| {task} ({METRIC[task].split(',')[0]}) | {n} | {cold:.1f} | {warm:.1f} | {peer:.1f} |"
                 f" {peer / warm:.2f}x | {m1:.4f} | {m2:.4f} | {agree} |")
  lines += ["", "Cold: the first evaluation in the process, with its compilations (a few shapes: powers of two in"
            " batch and length); warm: the same again. Seconds are lm-eval's whole simple_evaluate (building"
            " requests, scoring, metrics), the same work for both backends."]
  record.publish(os.path.join(HERE, "results.md"), HEADER, lines, factor)


if __name__ == "__main__":
  main()
