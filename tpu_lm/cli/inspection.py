"""Look inside a trained model: python -m tpu_lm.interpret --workdir=RUN --text="..."

  python -m tpu_lm.interpret --workdir=workdirs/base --text='def main():' \\
      [--target=' return'] [--position=-1] [--corrupt='def test():'] [--out=DIR]

Prints the logit lens (the top next-token prediction read off every layer's residual
stream, per position) and the attributions of one prediction (gradient x input and
integrated gradients, per input token); with --corrupt, activation patching: how
much of the prediction each (layer, position) of the clean text restores in the
corrupted one. Writes attention heatmaps (PNG per layer), attributions.png,
patching.png, one self-contained inspect.html and inspect.json to --out (default
RUN/inspect). From Python: tpu_lm.interpret.run.load + analysis.inspect_text.
"""

import os

from absl import flags

from tpu_lm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a language model.")
_TEXT = flags.DEFINE_string("text", None, "The text to look inside.")
_TARGET = flags.DEFINE_string("target", "", "The next token to explain (default: the model's top prediction).")
_POSITION = flags.DEFINE_integer("position", -1, "The position whose prediction is explained (negative: from the end).")
_CORRUPT = flags.DEFINE_string("corrupt", "", "A corrupted text of the same token length, for activation patching.")
_OUT = flags.DEFINE_string("out", "", "Where the pictures and the page go (default: RUN/inspect).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Predictions kept per layer and position in the logit lens.")
_IG_STEPS = flags.DEFINE_integer("ig_steps", 64, "Integration steps of integrated gradients.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to read (default: the newest).")
flags.mark_flags_as_required(["workdir", "text"])


def body() -> None:
  if _IG_STEPS.value < 1 or _TOP_K.value < 1:
    raise UserError("--ig_steps and --top_k must be at least 1.")
  from tpu_lm.interpret import analysis, run

  m = run.load(_WORKDIR.value, _STEP.value)
  out = _OUT.value or os.path.join(m.workdir, "inspect")
  r = analysis.inspect_text(m, _TEXT.value, out=out, target=_TARGET.value, position=_POSITION.value,
                            corrupt=_CORRUPT.value, top_k=_TOP_K.value, ig_steps=_IG_STEPS.value)
  a = r["attributions"]
  print(f"{m.workdir} at step {m.step}: {len(r['tokens'])} tokens\n")
  print("logit lens (top prediction and its probability, per probe point):")
  print(r["lens_table"])
  print(f"\nattributions to {r['target']!r} after position {r['position']} {r['tokens'][r['position']]!r}"
        f" (log p {a['logprob']:.3f}; baseline {a['baseline_logprob']:.3f}; integrated gradients add up to the"
        f" difference within {abs(a['completeness_gap']):.4f}):")
  for t, piece in enumerate(r["tokens"][:r["position"] + 1]):
    print(f"  {t:>3} {piece!r:<16} gradient x input {a['grad_x_input'][t]:+.4f}"
          f"   integrated gradients {a['integrated_gradients'][t]:+.4f}")
  if "patching" in r:
    p = r["patching"]
    print(f"\nactivation patching (log p clean {p['clean_logprob']:.3f}, corrupted {p['corrupt_logprob']:.3f});"
          " share restored by patching one activation:")
    for name, row in zip(p["points"], p["restored_PxT"]):
      best = int(abs(row).argmax()) if row.size else 0
      print(f"  {name:<12} most at position {best} {r['tokens'][best]!r}: {row[best]:+.2f}")
  print("\nwrote " + ", ".join(r["files"]))
