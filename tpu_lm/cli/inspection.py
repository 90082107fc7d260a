"""Look inside a trained model: python -m tpu_lm.interpret --workdir=RUN --text="..."

  python -m tpu_lm.interpret --workdir=workdirs/base --text='def main():' \\
      [--target=' return'] [--position=-1] [--corrupt='def test():'] [--out=DIR]

Prints the logit lens (the top next-token prediction read off every layer's residual
stream, per position) and the attributions of one prediction (gradient x input and
integrated gradients, per input token); with --corrupt, activation patching: how
much of the prediction each (layer, position) of the clean text restores in the
corrupted one. With --image (a run that reads images, task.kind="reading"): what the
model reads in the picture (or --text, a transcript to explain) and, per token, which
patches of the picture its prediction attends to, drawn over the picture
(image_attention.png). Writes attention heatmaps (PNG per layer), attributions.png,
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
_IMAGE = flags.DEFINE_string("image", None, "A picture for a run that reads images: shows where each token it reads"
                             " looks (--text: a transcript to explain instead of the model's own reading).")
flags.mark_flags_as_required(["workdir"])


def body() -> None:
  if _IG_STEPS.value < 1 or _TOP_K.value < 1:
    raise UserError("--ig_steps and --top_k must be at least 1.")
  from tpu_lm.interpret import analysis, run

  if _TEXT.value is None and _IMAGE.value is None:
    raise UserError("pass --text=TEXT (the text to look inside), or --image=FILE for a run that reads images.")
  m = run.load(_WORKDIR.value, _STEP.value)
  out = _OUT.value or os.path.join(m.workdir, "inspect")
  if _IMAGE.value is not None:
    _inspect_image(m, out)
    return
  if m.model.cfg.vision is not None:
    raise UserError(f"{m.workdir} reads images: pass --image=FILE (and --text for a transcript to explain).")
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


def _inspect_image(m, out: str) -> None:
  from tpu_lm import storage
  from tpu_lm.interpret import image_attention
  from tpu_lm.tasks import reading

  vision = m.model.cfg.vision
  if vision is None:
    raise UserError(f"{m.workdir} reads no images (it has no vision encoder): leave out --image.")
  if _CORRUPT.value or _TARGET.value:
    raise UserError("--corrupt and --target explain text prompts: leave them out with --image.")
  try:
    with storage.open(_IMAGE.value, "rb") as f:
      pixels = reading.decode_image(f.read(), (vision.image_height, vision.image_width, vision.channels))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read --image={_IMAGE.value}: {getattr(e, 'strerror', None) or e}; pass a PNG or JPEG"
                    " file.") from None
  r = image_attention.inspect_image(m, pixels, _TEXT.value, out=out)
  rows, cols = vision.grid
  print(f"{m.workdir} at step {m.step}: {'explaining' if _TEXT.value is not None else 'reads'} {r['text']!r}\n")
  print(f"per token, the image's share of its prediction's attention and the patch it looks at most"
        f" ({rows} x {cols} patches of {vision.patch_shape[0]} x {vision.patch_shape[1]} pixels; row, column):")
  for piece, attention_RxC in zip(r["tokens"], r["maps_KxRxC"]):
    row, col = divmod(int(attention_RxC.argmax()), cols)
    print(f"  {piece!r:<12} {attention_RxC.sum():.2f}  patch ({row}, {col})")
  print("\nwrote " + ", ".join(r["files"]))
