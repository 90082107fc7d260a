"""Speculative decoding against the target alone: acceptance rate and tokens/s.

The target is configs/teacher.py's run, the draft the student distilled from it with
configs/distill.py (any run speaking the target's tokenizer will do: --draft). For
each batch size, sampling (greedy, temperature 1) and k (draft tokens a round), the
same prompts are decoded by the target alone (tpu_lm.inference.decode.Decoder) and
with the draft (tpu_lm.inference.speculative.SpeculativeDecoder); the draft alone is
timed too, for its cost against the target's. Each configuration is compiled once,
then timed --repeats times; the fastest counts (the machine is shared).

  tokens/s = new tokens generated / wall time of the generate call (prefill included)
  tokens per target pass = 1 + acceptance rate x k

usage: python experiments/speculative/run.py --target RUN --draft RUN [--ks 2 3 4 5 6 7 8] [--batches 1 8]
Prints a table and puts it on top of results.md beside this script (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.speculative.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.speculative.run", *sys.argv[1:]])

import argparse
import os
import time

from experiments import record
from tpu_lm.parallel import libtpu_env

libtpu_env.quiet_where_no_tpu()  # before JAX starts its backends
import jax  # noqa: E402

from tpu_lm.inference import run_dir, speculative  # noqa: E402
from tpu_lm.inference.sampling import Sampling  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = "Speculative decoding: acceptance and tokens/s against the target alone (experiments/speculative)"
# Openings of Python code, as the teacher was trained on (the python_stdlib corpus).
PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Parser:\n    def __init__(self, text):\n        self.",
           "    for i in range(len(", "def read_file(path):\n    with open(path) as f:\n        ",
           "    if not isinstance(value, str):\n        raise TypeError(", "from collections import",
           "    return self._", "# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for"]


def timed(decoder, prompts, sampling, repeats):
  """(fastest seconds, completions) of `repeats` calls after a first one that compiles."""
  decoder.generate(prompts, sampling)
  best, out = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = decoder.generate(prompts, sampling)
    best = min(best, time.perf_counter() - start)
  return best, out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--target", default="/work/runs/teacher")
  parser.add_argument("--draft", default="/work/runs/student")
  parser.add_argument("--ks", nargs="*", type=int, default=list(range(2, 9)))
  parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
  parser.add_argument("--temperatures", nargs="*", type=float, default=[0.0, 1.0])
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--note", default="", help="a line of context for results.md")
  args = parser.parse_args()

  devices = jax.devices()[:1]
  target = run_dir.load(args.target, devices=devices)
  draft = run_dir.load(args.draft, devices=devices)
  n_params = lambda run: sum(x.size for x in jax.tree.leaves(run.decoder.params))  # noqa: E731
  factor = record.speed_factor()
  about = (f"jax {jax.__version__}; target {target.workdir} (step {target.step}, {n_params(target) / 1e6:.1f}M"
           f" parameters), draft {draft.workdir} (step {draft.step}, {n_params(draft) / 1e6:.1f}M);"
           f" {args.new_tokens} new tokens a prompt, fastest of {args.repeats}")
  lines = [args.note, ""] if args.note else []
  lines += ["| batch | sampling | k | acceptance | tokens per target pass | tokens/s | vs target alone |",
            "|---|---|---|---|---|---|---|"]
  path = os.path.join(HERE, "results.md")
  print(record.title(factor, about) + "\n\n" + "\n".join(lines), flush=True)
  published = False
  for batch in args.batches:
    prompts = [target.encode_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    for temperature in args.temperatures:
      sampling = [Sampling(args.new_tokens, temperature, seed=i) for i in range(batch)]
      name = "greedy" if temperature == 0 else f"T={temperature:g}"
      base_s, out = timed(target.decoder, prompts, sampling, args.repeats)
      base = sum(len(c.tokens) for c in out) / base_s
      draft_s, out = timed(draft.decoder, prompts, sampling, args.repeats)
      rows = [f"| {batch} | {name} | target alone | | 1 | {base:,.1f} | 1.00 |",
              f"| {batch} | {name} | draft alone | | | {sum(len(c.tokens) for c in out) / draft_s:,.1f} | |"]
      for k in args.ks:
        spec = speculative.SpeculativeDecoder(target.decoder, draft.decoder, k)
        spec_s, out = timed(spec, prompts, sampling, args.repeats)
        rate = sum(a.accepted for a in spec.last) / max(1, sum(a.proposed for a in spec.last))
        tps = sum(len(c.tokens) for c in out) / spec_s
        rows.append(f"| {batch} | {name} | {k} | {rate:.0%} | {1 + rate * k:.2f} | {tps:,.1f} | {tps / base:.2f} |")
      for row in rows:
        print(row, flush=True)
      lines += rows
      record.publish(path, HEADER, lines, factor, about, replace_latest=published, quiet=True)
      published = True  # the same entry grows


if __name__ == "__main__":
  main()
