"""Fill in the middle, measured: what FIM training costs left to right, and what it buys
on an infilling benchmark made from held-out code.

  python -m tpu_lm.main --config=configs/base.py --workdir=workdirs/base
  python -m tpu_lm.main --config=configs/fim.py --workdir=workdirs/fim
  python -m experiments.fim.run --fim=workdirs/fim --plain=workdirs/base [--examples=200]

1. FIM for free (Bavarian et al. 2022): the two runs' left-to-right bits per byte on the
   held-out split, same data, model and budget; the paper finds no cost.
2. Infilling (in the style of HumanEval-infilling and SantaCoder's evaluation): from the
   functions of the default corpus's held-out files (the validation split of the
   standard library, never trained on), mask one line of a function body (single-line)
   or a block of 2-8 lines (multi-line); the prefix is the function before it, the
   suffix the function after it, each cut to fit the 256-token context. Each model
   decodes greedily; every answer is cut to as many lines as the truth (what a
   left-to-right model needs to be comparable at all), then scored by exact match
   (trailing whitespace ignored) and character-level edit similarity (1 - Levenshtein
   / longer length). Rows: the FIM model given prefix and suffix (prompted in SPM, its
   default, and in PSM), the FIM model given only the prefix, the plain model given
   only the prefix. Beside the greedy answers,
   the likelihood of the true middle under each (bits per byte of its tokens, the
   paper's FIM loss): how much the suffix tells the model, free of decoding's noise.

Prints the table and examples side by side, and puts them on top of results.md beside
this file (newest first), with a plot.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.fim.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.fim.run", *sys.argv[1:]])

import argparse
import ast
import json
import math
import os
import random
import time

HERE = os.path.dirname(os.path.abspath(__file__))
from experiments import record  # noqa: E402

CONTEXT = 256  # the base config's context (model.max_len)
NEW_TOKENS = {"single-line": 32, "multi-line": 96}


def final_eval(workdir: str) -> tuple[int, float]:
  """(step, eval_bpb) of a run's last eval."""
  last = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval_bpb" in row:
        last = (row["step"], row["eval_bpb"])
  if last is None:
    raise SystemExit(f"{workdir} has no eval in metrics.jsonl: train it first.")
  return last


def heldout_functions(config) -> list[list[str]]:
  """The functions (their source lines, as in the file) of the held-out split's files."""
  from tpu_lm.data import sources

  validation = sources.open_splits(config.data).validation
  out = []
  for record_ in validation.get(range(len(validation))):
    text = record_["text"].decode() if isinstance(record_["text"], bytes) else record_["text"]
    try:
      tree = ast.parse(text)
    except SyntaxError:
      continue
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 3:
        out.append(lines[node.lineno - 1:node.end_lineno])
  return out


def examples(functions: list[list[str]], kind: str, n: int, seed: int) -> list[dict]:
  """`n` masked spans of `kind`: {prefix, middle, suffix} texts, the middle whole lines
  of a function's body (not blank)."""
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    lines = rng.choice(functions)
    size = 1 if kind == "single-line" else rng.randint(2, 8)
    if len(lines) - 1 < size:
      continue
    start = rng.randint(1, len(lines) - size)  # never the def line
    middle = lines[start:start + size]
    if not "".join(middle).strip() or not middle[0].strip():
      continue
    out.append({"prefix": "".join(lines[:start]), "middle": "".join(middle), "suffix": "".join(lines[start + size:])})
  return out


def fit(tokenizer, ex: dict, new_tokens: int) -> dict:
  """The example with its prefix cut from the left and its suffix from the right (at line
  boundaries) until the infill prompt and the answer fit the context."""
  budget = CONTEXT - new_tokens - 8  # BOS and the sentinels
  prefix, suffix = ex["prefix"].splitlines(keepends=True), ex["suffix"].splitlines(keepends=True)
  count = lambda parts: len(tokenizer.encode_batch(["".join(parts)])[0])  # noqa: E731
  while count(prefix) + count(suffix) > budget:
    if count(suffix) >= count(prefix) and suffix:
      suffix.pop()
    else:
      prefix.pop(0)
  return {**ex, "prefix": "".join(prefix), "suffix": "".join(suffix)}


def first_lines(text: str, n: int) -> str:
  return "".join(text.splitlines(keepends=True)[:n])


def normalized(text: str) -> str:
  return "\n".join(line.rstrip() for line in text.rstrip("\n").split("\n"))


def edit_similarity(a: str, b: str) -> float:
  from tpu_lm.tasks.reading import edit_distance

  if not a and not b:
    return 1.0
  return 1 - edit_distance(a, b) / max(len(a), len(b))


def answers(run, prompts: list[list[int]], new_tokens: int, end_id, max_batch: int) -> list[str]:
  from tpu_lm.inference import complete
  from tpu_lm.inference.sampling import Sampling

  wanted = [complete.Wanted(p, Sampling(new_tokens, 0.0, 0, 1.0, 0), end_id=end_id) for p in prompts]
  return complete.complete(run, wanted, max_batch)


def middle_bpb(run, prompts: list[list[int]], middles: list[list[int]], num_bytes: int) -> float:
  """Bits per UTF-8 byte of the middles' tokens, each after its prompt (one scoring pass
  per batch: inference/score.py)."""
  nats = 0.0
  for start in range(0, len(prompts), 32):
    batch = [p + m for p, m in zip(prompts[start:start + 32], middles[start:start + 32])]
    for scored, m in zip(run.score(batch), middles[start:start + 32]):
      nats -= float(scored.logprobs[-len(m):].sum())
  return nats / math.log(2) / num_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fim", required=True, help="a run trained with configs/fim.py")
  parser.add_argument("--plain", required=True, help="the same config trained left to right (configs/base.py)")
  parser.add_argument("--examples", type=int, default=200, help="masked spans per kind")
  parser.add_argument("--max_batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  from tpu_lm.inference import run_dir

  factor = record.speed_factor()
  fim_run, plain_run = run_dir.load(args.fim), run_dir.load(args.plain)
  evals = {name: final_eval(path) for name, path in (("fim", args.fim), ("plain", args.plain))}
  functions = heldout_functions(fim_run.config)
  rows, shown = [], []
  t0 = time.time()
  for kind, new_tokens in NEW_TOKENS.items():
    exs = [fit(fim_run.tokenizer, ex, new_tokens) for ex in examples(functions, kind, args.examples, args.seed)]
    end = fim_run.objective.end_id(fim_run.tokenizer)
    infill = lambda order: [fim_run.objective.infill_prompt(fim_run.tokenizer, e["prefix"], e["suffix"], order)  # noqa: E731
                            for e in exs]
    outputs = {
        "FIM model, prefix + suffix (SPM)": answers(fim_run, infill("spm"), new_tokens, end, args.max_batch),
        "FIM model, prefix + suffix (PSM)": answers(fim_run, infill("psm"), new_tokens, end, args.max_batch),
        "FIM model, prefix only": answers(fim_run, [fim_run.encode_prompt(e["prefix"]) for e in exs], new_tokens,
                                          None, args.max_batch),
        "plain model, prefix only": answers(plain_run, [plain_run.encode_prompt(e["prefix"]) for e in exs],
                                            new_tokens, None, args.max_batch),
    }
    # The true middles' likelihood, on the examples whose three sequences fit the context.
    middles = [list(map(int, ids)) for ids in fim_run.tokenizer.encode_batch([e["middle"] for e in exs])]
    prompts = {
        "FIM model, prefix + suffix (SPM)": (fim_run, infill("spm")),
        "FIM model, prefix + suffix (PSM)": (fim_run, infill("psm")),
        "FIM model, prefix only": (fim_run, [fim_run.encode_prompt(e["prefix"]) for e in exs]),
        "plain model, prefix only": (plain_run, [plain_run.encode_prompt(e["prefix"]) for e in exs]),
    }
    fits = [i for i in range(len(exs)) if all(len(p[i]) + len(middles[i]) <= CONTEXT + 1 for _, p in prompts.values())]
    num_bytes = sum(len(exs[i]["middle"].encode()) for i in fits)
    for name, outs in outputs.items():
      cut = [first_lines(o, len(e["middle"].splitlines())) for o, e in zip(outs, exs)]
      em = sum(normalized(c) == normalized(e["middle"]) for c, e in zip(cut, exs)) / len(exs)
      es = sum(edit_similarity(normalized(c), normalized(e["middle"])) for c, e in zip(cut, exs)) / len(exs)
      run, ps = prompts[name]
      bpb = middle_bpb(run, [ps[i] for i in fits], [middles[i] for i in fits], num_bytes)
      rows.append((kind, name, em, es, bpb, len(fits)))
    for i in range(2):
      shown.append((kind, exs[i], {name: first_lines(outs[i], len(exs[i]["middle"].splitlines()))
                                   for name, outs in outputs.items()}))
  elapsed = time.time() - t0

  (fim_step, fim_bpb), (plain_step, plain_bpb) = evals["fim"], evals["plain"]
  lines = [
      f"Left to right on the held-out split: FIM run {fim_bpb:.4f} bits/byte at step {fim_step}, plain run"
      f" {plain_bpb:.4f} at step {plain_step}: difference {fim_bpb - plain_bpb:+.4f}.",
      "",
      f"Infilling, {args.examples} masked spans per kind from {len(functions)} held-out functions, greedy, answers"
      f" cut to the truth's line count ({elapsed:.0f} s for all rows):",
      "",
      "| kind | model and input | exact match | edit similarity | true middle, bits/byte (examples) |",
      "|---|---|---:|---:|---:|",
      *[f"| {kind} | {name} | {em:.1%} | {es:.3f} | {bpb:.3f} ({n}) |" for kind, name, em, es, bpb, n in rows],
      "",
      "Examples (the first two of each kind; `⏎` ends a line):",
      "",
  ]
  show = lambda text: text.replace("\n", "⏎").replace("|", "\\|")[:120]  # noqa: E731
  for kind, ex, outs in shown:
    lines.append(f"- {kind}, after `{show(ex['prefix'][-60:])}`: truth `{show(ex['middle'])}`")
    lines += [f"  - {name}: `{show(out)}`" for name, out in outs.items()]
  record.publish(os.path.join(HERE, "results.md"), "Fill in the middle: its cost left to right and infilling",
                 lines, factor, about=f"{args.fim} vs {args.plain}")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"bpb": {"fim": fim_bpb, "plain": plain_bpb, "steps": [fim_step, plain_step]},
               "rows": [{"kind": k, "model": n, "exact_match": em, "edit_similarity": es, "middle_bpb": bpb,
                         "scored": count} for k, n, em, es, bpb, count in rows]},
              f, indent=1)
  plot(rows)


def plot(rows) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = list(dict.fromkeys(k for k, *_ in rows))
  names = list(dict.fromkeys(n for _, n, *_ in rows))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (metric, col) in zip(axes, (("exact match", 2), ("edit similarity", 3),
                                      ("true middle, bits/byte (lower is better)", 4))):
    for j, name in enumerate(names):
      values = [next(r[col] for r in rows if r[0] == k and r[1] == name) for k in kinds]
      ax.bar([i + 0.2 * (j - 1.5) for i in range(len(kinds))], values, width=0.2, label=name)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_title(metric)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "fim.png"), dpi=120)


if __name__ == "__main__":
  main()
