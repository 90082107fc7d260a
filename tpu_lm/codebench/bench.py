"""The benchmark on one run: each problem's prompt completed `samples` times by the run's
model, each completion's body run against the problem's doctests in the sandbox, and
pass@k over the problems. Problems whose prompt and max_new_tokens do not fit the model's
context are skipped and counted apart, never scored as failures.
"""

import collections
import dataclasses
import json
import os
import platform

from tpu_lm import storage
from tpu_lm.codebench import contamination, metrics, sandbox
from tpu_lm.codebench import problems as problems_lib

# A function's body ends where a line starts at column 0 (HumanEval's stop sequences, and "@").
STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n@")


@dataclasses.dataclass(frozen=True)
class Settings:
  samples: int = 5
  ks: tuple[int, ...] = (1, 5)
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 0.95
  max_new_tokens: int = 128
  seed: int = 0
  limit: int = 0  # the first this many problems (0: all)
  max_batch: int = 8
  workers: int = 2  # sandbox processes at a time
  limits: sandbox.Limits = sandbox.Limits()


def body(completion: str) -> str:
  """The completion up to its first line at column 0: the rest is not the function."""
  kept = []
  for line in completion.splitlines(keepends=True):
    if line.strip() and not line[0].isspace():
      break
    kept.append(line)
  return "".join(kept)


def evaluate(run, problems: list[problems_lib.Problem], settings: Settings, problem_set: str = "",
             on_progress=print) -> tuple[dict, list[dict]]:
  """(results, samples): the results file's content, and one record per completion."""
  from tpu_lm.inference.complete import Wanted, complete
  from tpu_lm.inference.sampling import Sampling

  chosen = problems[:settings.limit] if settings.limit else problems
  fits, skipped = [], []
  for p in chosen:
    ids = run.encode_prompt(p.prompt)
    (fits if len(ids) + settings.max_new_tokens <= run.decoder.max_len else skipped).append((p, ids))
  wanted = [Wanted(ids, Sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                 (settings.seed + j) % 2**32), stop=STOP)
            for _, ids in fits for j in range(settings.samples)]
  on_progress(f"{len(chosen)} problems: {len(fits)} fit the model's context of {run.decoder.max_len} tokens with"
              f" {settings.max_new_tokens} new ones, {len(skipped)} skipped; generating {len(wanted)} completions")
  texts = complete(run, wanted, settings.max_batch)
  jobs = []
  for i, (p, _) in enumerate(fits):
    for j in range(settings.samples):
      jobs.append((p.program(body(texts[i * settings.samples + j])), p.test, p.id))
  on_progress(f"running {len(jobs)} programs in the sandbox, {settings.workers} at a time")
  outcomes = sandbox.run_many(jobs, settings.limits, settings.workers)

  samples, per_problem = [], []
  for i, (p, ids) in enumerate(fits):
    mine = outcomes[i * settings.samples:(i + 1) * settings.samples]
    for j, o in enumerate(mine):
      samples.append({"id": p.id, "sample": j, "completion": texts[i * settings.samples + j], "status": o.status,
                      "reason": o.reason})
    n, c = len(mine), sum(o.status == "passed" for o in mine)
    per_problem.append({"id": p.id, "prompt_tokens": len(ids), "n": n, "c": c,
                        **{f"pass@{k}": metrics.pass_at_k(n, c, k) for k in settings.ks},
                        "outcomes": dict(collections.Counter(o.status for o in mine))})
  counts = [(r["n"], r["c"]) for r in per_problem]
  seen = contamination.seen(run.config, chosen)
  results = {
      "config": {"workdir": run.workdir, "step": run.step, "samples": settings.samples, "k": list(settings.ks),
                 "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
                 "max_new_tokens": settings.max_new_tokens, "seed": settings.seed, "limit": settings.limit,
                 "timeout_s": settings.limits.timeout_s, "memory_mb": settings.limits.memory_mb,
                 "python": platform.python_version(), "problem_set": problem_set,
                 "problem_set_python": sorted({p.python for p in chosen}), "stop": list(STOP)},
      "problems": {"total": len(chosen), "evaluated": len(fits), "skipped": len(skipped),
                   "skipped_ids": [p.id for p, _ in skipped],
                   "skipped_why": f"prompt + max_new_tokens over the model's context of {run.decoder.max_len} tokens"},
      "pass_at_k": {f"pass@{k}": metrics.mean_pass_at_k(counts, k) if counts else None for k in settings.ks},
      "outcomes": dict(collections.Counter(o.status for o in outcomes)),
      "seen_in_training": {**seen, "evaluated": len(set(seen["ids"]) & {p.id for p, _ in fits})},
      "per_problem": per_problem,
  }
  return results, samples


def table(results: dict) -> list[str]:
  """The results as a markdown table, one row."""
  ks = results["config"]["k"]
  pk = results["pass_at_k"]
  cell = lambda v: "n/a" if v is None else f"{v:.3f}"
  o = results["outcomes"]
  p = results["problems"]
  s = results["seen_in_training"]
  return [f"| run (step) | problems evaluated | skipped (too long) | samples | {' | '.join(f'pass@{k}' for k in ks)} |"
          " passed / failed / timeout / error | seen in training |",
          "|---|---|---|---|" + "---|" * len(ks) + "---|---|",
          f"| {os.path.basename(results['config']['workdir'])} ({results['config']['step']}) | {p['evaluated']} of"
          f" {p['total']} | {p['skipped']} | {results['config']['samples']} |"
          f" {' | '.join(cell(pk[f'pass@{k}']) for k in ks)} | {o.get('passed', 0)} / {o.get('failed', 0)} /"
          f" {o.get('timeout', 0)} / {o.get('error', 0)} | {s['evaluated']} of {p['evaluated']} |"]


def write(results: dict, samples: list[dict], out: str) -> list[str]:
  """results.json, results.md and samples.jsonl in `out`; returns their paths."""
  storage.makedirs(out)
  paths = [os.path.join(out, name) for name in ("results.json", "results.md", "samples.jsonl")]
  with storage.open(paths[0], "w") as f:
    json.dump(results, f, indent=1)
  c = results["config"]
  with storage.open(paths[1], "w") as f:
    f.write("\n".join([f"# Code benchmark: {c['workdir']} at step {c['step']}", "", *table(results), "",
                       f"Problem set {c['problem_set']}, Python {c['python']}; temperature {c['temperature']},"
                       f" top_p {c['top_p']}, top_k {c['top_k']}, {c['max_new_tokens']} new tokens, seed {c['seed']}."
                       f" Skipped problems: {results['problems']['skipped_why']}.", ""]))
  with storage.open(paths[2], "w") as f:
    for s in samples:
      f.write(json.dumps(s) + "\n")
  return paths
