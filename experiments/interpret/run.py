"""Looking inside the base model: what does it use to predict an attribute name it has seen?

Runs the inspect command (tpu_lm/cli/inspection.py) on the base run, from the repository root:

  python -m tpu_lm.interpret --workdir=BASE --text='def add(self, other):
      return self.value + other.' --target=value \\
      --corrupt='def add(self, other):
      return self.count + other.' --out=experiments/interpret

which writes the attention maps (attention_layer<i>.png, inspect.html), the attributions
(attributions.png), activation patching (patching.png) and inspect.json beside this file,
and puts a summary on top of results.md (newest first): the target's log-probability,
the largest integrated-gradients attributions and how close they add up, and the
activation that restores most of the prediction at each probe point.

  python experiments/interpret/run.py [--base=workdirs/base] [--target=value]

Needs the base run (python -m tpu_lm.main --config=configs/base.py, about 7 minutes on
2 cores; run.py trains it into --base if it has no checkpoints). The command itself
takes about a minute. Any run works at a small size, e.g. configs/tiny.py's byte-level
model with --target=v (a target must be one token).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.interpret.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.interpret.run", *sys.argv[1:]])

import argparse
import json
import os
import re
import subprocess
import sys

from experiments import record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADER = "Looking inside the base model (python -m tpu_lm.interpret)"
TEXT = "def add(self, other):\n    return self.value + other."
CORRUPT = "def add(self, other):\n    return self.count + other."


def summary(saved: dict, corrupted: str) -> list[str]:
  """The results entry's table, from inspect.json and the corrupted text's log p (printed)."""
  tokens, attr = saved["tokens"], saved["attributions"]
  ig = attr["integrated_gradients"]
  top = sorted(range(len(ig)), key=lambda t: -abs(ig[t]))[:3]
  restored = []
  for name, row in zip(saved["lens_points"], saved.get("patching_restored", [])):
    best = max(range(len(row)), key=lambda t: abs(row[t]))
    restored.append(f"{name}: {tokens[best]!r} ({best}) {row[best]:+.2f}")
  return [
      "| | |", "|---|---|",
      f"| text | `{TEXT.replace(chr(10), chr(92) + 'n')}` ({len(tokens)} tokens with `<bos>`) |",
      f"| target | {saved['target']!r} after position {saved['position']} {tokens[saved['position']]!r} |",
      "| log p of the target: clean / corrupted (`self.count`) / padding baseline |"
      f" {attr['logprob']:.3f} / {corrupted} / {attr['baseline_logprob']:.3f} |",
      "| integrated gradients, the three largest | "
      + ", ".join(f"{tokens[t]!r} ({t}) {ig[t]:+.3f}" for t in top) + " |",
      f"| integrated gradients' sum against f(x) - f(baseline) | within {abs(attr['completeness_gap']):.4f} |",
      "| activation patching: the share restored, largest per probe point | " + "; ".join(restored) + " |",
      "", "Pictures: attention_layer<i>.png (one per layer), attributions.png, patching.png; the page"
      " inspect.html (a layer and head to pick); every number: inspect.json.",
  ]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", default="workdirs/base", help="the run directory to look inside")
  p.add_argument("--target", default="value", help="the next token to explain (one token)")
  args = p.parse_args()
  base = os.path.abspath(args.base)
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    print(f"training the base config into {base} (about 7 minutes on a 2-core CPU)", flush=True)
    subprocess.run([sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={base}"], cwd=ROOT,
                   check=True, capture_output=True)
  factor = record.speed_factor()
  cmd = [sys.executable, "-m", "tpu_lm.interpret", f"--workdir={base}", f"--text={TEXT}", f"--target={args.target}",
         f"--corrupt={CORRUPT}", f"--out={HERE}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"the inspect command failed: {out.stderr.strip()}")
  print(out.stdout, flush=True)
  patched = re.search(r"log p clean -?[\d.]+, corrupted (-?[\d.]+)", out.stdout)  # not in inspect.json
  with open(os.path.join(HERE, "inspect.json")) as f:
    saved = json.load(f)
  record.publish(os.path.join(HERE, "results.md"), HEADER, summary(saved, patched[1] if patched else "-"), factor,
                 about=f"{args.base}, target {args.target!r}")


if __name__ == "__main__":
  main()
