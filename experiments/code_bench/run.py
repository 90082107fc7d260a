"""The offline code benchmark (pass@k on standard-library doctests) on a small base
model and on the same model fine-tuned on Python functions.

  python experiments/code_bench/run.py [--base=RUN] [--base_steps=1200] [--finetune_steps=300] [--samples=5]

The base is configs/base.py (the default corpus, the standard library; SentencePiece
2048) with a 512-token context, so most prompts fit with 128 new tokens: --base_steps of
4 x 512 tokens (about 3 minutes on a 2-core CPU), or --base=RUN reused. The fine-tuned
run starts from it (configs/finetune.py) on a text_files corpus of every standard-library
function that has a docstring, written as signature + docstring + body like the
benchmark's prompts, from every file except the benchmark problems' own (checked: no
problem's source is in it). Each run is benchmarked by the real command (python -m
tpu_lm.codebench) in a subprocess. Prints the table and puts it on top of results.md
beside this file (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.code_bench.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.code_bench.run", *sys.argv[1:]])

import argparse
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import record  # noqa: E402


def functions_corpus(directory: str, problems) -> str:
  """One file per standard-library module (the problems' files left out) holding its
  top-level functions that have a docstring, as written."""
  from tpu_lm.codebench import problems as problems_lib

  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  excluded = {p.path for p in problems}
  for module, rel in problems_lib.stdlib_sources():
    if rel in excluded:
      continue
    source = (root / rel).read_text(encoding="utf-8", errors="replace")
    try:
      tree = ast.parse(source)
    except SyntaxError:
      continue
    lines = source.splitlines(keepends=True)
    found = ["".join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body
             if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)]
    if found:
      with open(os.path.join(directory, f"{module}.py"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(found))
  leaked = problems_lib.in_text(problems, problems_lib.corpus_text(directory))
  assert not leaked, f"the fine-tuning corpus holds benchmark problems: {sorted(leaked)}"
  return directory


def train(workdir: str, config: str, overrides: dict) -> float:
  t0 = time.time()
  cmd = [sys.executable, "-m", "tpu_lm.main", f"--config={config}", f"--workdir={workdir}"]
  out = subprocess.run(cmd + [f"--config.{k}={v}" for k, v in overrides.items()], cwd=ROOT, capture_output=True,
                       text=True)
  if out.returncode:
    raise SystemExit(f"training {workdir} failed:\n{out.stderr[-3000:]}")
  return time.time() - t0


def last_eval(workdir: str) -> dict:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if "eval_bpb" in r][-1]


def bench(workdir: str, args) -> dict:
  t0 = time.time()
  cmd = [sys.executable, "-m", "tpu_lm.codebench", f"--workdir={workdir}", f"--samples={args.samples}",
         f"--k=1,{args.samples}", f"--temperature={args.temperature}", f"--max_new_tokens={args.max_new_tokens}",
         f"--seed={args.seed}", f"--limit={args.limit}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"the benchmark on {workdir} failed:\n{out.stderr[-3000:]}")
  print(out.stdout, flush=True)
  results = json.load(open(os.path.join(workdir, "codebench", "results.json")))
  return {**results, "wall_s": time.time() - t0, "command": " ".join(cmd[2:])}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--base", default="", help="A base run to reuse (default: train one into --work/base).")
  p.add_argument("--base_steps", type=int, default=1200)
  p.add_argument("--finetune_steps", type=int, default=300)
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--limit", type=int, default=0)
  p.add_argument("--work", default=os.path.join(ROOT, "workdirs", "code_bench"))
  args = p.parse_args()
  from tpu_lm.codebench import problems as problems_lib

  factor = record.speed_factor()
  base = os.path.abspath(args.base or os.path.join(args.work, "base"))
  base_wall = None
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    print(f"training the base into {base}", flush=True)
    base_wall = train(base, "configs/base.py", {
        "num_train_steps": args.base_steps, "eval_every_steps": args.base_steps,
        "checkpoint_every_steps": args.base_steps, "model.max_len": 512, "data.seq_len": 512,
        "data.global_batch_size": 4, "sample.num_prompts": 0})
  problems = problems_lib.read()
  corpus = functions_corpus(os.path.join(args.work, "functions"), problems)
  tuned = os.path.join(args.work, "finetuned")
  shutil.rmtree(tuned, ignore_errors=True)
  print(f"fine-tuning into {tuned} on {corpus}", flush=True)
  tuned_wall = train(tuned, f"configs/finetune.py:{base}", {
      "num_train_steps": args.finetune_steps, "eval_every_steps": args.finetune_steps,
      "checkpoint_every_steps": args.finetune_steps, "data.dataset": "text_files", "data.path": corpus,
      "sample.num_prompts": 0})
  rows = [("base (default corpus)", base, base_wall, bench(base, args)),
          ("fine-tuned on functions", tuned, tuned_wall, bench(tuned, args))]

  k = args.samples
  first = rows[0][3]
  lines = [f"{first['problems']['total']} problems ({first['config']['problem_set']}), {k} samples each at temperature"
           f" {args.temperature} (top_p 0.95), at most {args.max_new_tokens} new tokens; a problem whose prompt and"
           f" {args.max_new_tokens} new tokens exceed the 512-token context is skipped, not failed.", "",
           f"| run | training | eval bits/byte (its own validation split) | evaluated (skipped) | pass@1 | pass@{k} |"
           " passed / failed / timeout / error | in training data | benchmark wall time |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, workdir, wall, r in rows:
    o, pk = r["outcomes"], r["pass_at_k"]
    trained = f"{r['config']['step']} steps" + (f", {wall:.0f} s" if wall else " (reused)")
    lines.append(f"| {name} | {trained} | {last_eval(workdir)['eval_bpb']:.4f} | {r['problems']['evaluated']}"
                 f" ({r['problems']['skipped']}) | {pk['pass@1']:.3f} | {pk[f'pass@{k}']:.3f} |"
                 f" {o.get('passed', 0)} / {o.get('failed', 0)} / {o.get('timeout', 0)} / {o.get('error', 0)} |"
                 f" {r['seen_in_training']['evaluated']} of {r['problems']['evaluated']} | {r['wall_s']:.0f} s |")
  lines += ["", "Both runs score what a 1.2M-parameter model trained for minutes on a CPU scores: it writes"
            " Python-looking lines, not working bodies (most samples do not parse: the `error` column)."
            " \"In training data\": the base's corpus is the standard"
            " library itself, so it has seen the problems whose files are in its training split (the benchmark"
            " reports this); the fine-tuning corpus leaves the problems' files out. Non-zero numbers need a model"
            " that can write code: hundreds of millions of parameters trained on billions of tokens of code (a GPU"
            " or TPU run of configs/gpt2_124m.py-size or larger, on a code corpus that excludes these functions),"
            " or an imported one (python -m tpu_lm.convert)."]
  record.publish(os.path.join(HERE, "results.md"), "Code benchmark: pass@k on standard-library doctests", lines,
                 factor, about=f"base {args.base_steps} steps x 4 x 512, fine-tune {args.finetune_steps} steps")
  kept = [{"name": n, "train_wall_s": t, **{key: r[key] for key in ("config", "problems", "pass_at_k", "outcomes",
                                                                       "seen_in_training", "wall_s")}}
          for n, _, t, r in rows]
  with open(os.path.join(HERE, "results.json"), "w") as f:  # paths relative to the repository
    f.write(json.dumps(kept, indent=1).replace(ROOT + os.sep, ""))


if __name__ == "__main__":
  main()
