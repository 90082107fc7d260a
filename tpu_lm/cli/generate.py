"""Sample from a trained run: tpu-lm generate (python -m tpu_lm.generate) --workdir=RUN --prompt "...".

Loads the newest checkpoint, its config and the run's tokenizer from RUN. One
completion streams to the terminal token by token; several (more prompts, or
--num_samples) are decoded together in one batch and printed in turn.
--interactive keeps the model loaded and reads one prompt per line.

--suffix asks a run trained to fill in the middle (task.kind="fim") for the text
between each prompt and the suffix: the middle is decoded until the model ends it,
and printed between the two.

--image=FILE gives a run that reads images (task.kind="reading", configs/reading.py)
a picture (PNG, JPEG, ...; resized to the model's image size) to read before each
prompt; the prompt may then be left out (the model reads the image alone).

--fill_mask asks an encoder run (task.kind="mlm") for the most likely tokens at each
<mask> in a text, with their probabilities (--top_k of them if given, else 5).

A completion stops decoding at the step its text shows a --stop sequence. Ctrl-C
stops decoding at the next step: what was generated is printed, then
"[interrupted]", and the command exits 130 (in --interactive mode it returns to the
prompt instead; Ctrl-D quits).
"""

import os
import signal
import sys

from absl import flags

from tpu_lm import cli
from tpu_lm.errors import UserError
from tpu_lm.inference.stops import StoppedText  # numpy and sentencepiece: no JAX

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by python -m tpu_lm.main.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPT_FILE = flags.DEFINE_multi_string("prompt_file", [], "A text file whose whole content is one prompt; repeatable.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt (seeds seed, seed+1, ...).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Stop after this many new tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this much probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text.")
_SUFFIX = flags.DEFINE_string("suffix", None, "Fill in the middle: the text after the gap, the prompt the text before"
                              " it (a run trained with task.kind='fim').")
_STOP = flags.DEFINE_multi_string("stop", [], "End a completion before the first occurrence of this text; repeatable.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
_TENSOR = flags.DEFINE_integer("tensor_parallel", 1, "Devices to split the model over (heads, MLP, vocabulary).")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Read prompts from stdin, one per line, model kept loaded.")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "Speculative decoding: a run directory with the same tokenizer"
                             " (e.g. a distilled student) whose model proposes tokens that --workdir's model checks;"
                             " the text is distributed as without it.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per round (1 to 16), with --draft_workdir.")
_FILL_MASK = flags.DEFINE_multi_string("fill_mask", [], "An encoder run (task.kind='mlm'): a text with <mask> where"
                                       " a token is missing; prints the likeliest tokens there. Repeatable.")
_IMAGE = flags.DEFINE_string("image", None, "A run that reads images (task.kind='reading'): a picture file each"
                             " prompt is read after; without --prompt the model reads the image alone.")
flags.mark_flags_as_required(["workdir"])
cli.at_least(_NUM_SAMPLES, 1)
cli.at_least(_TENSOR, 1)
cli.check_flag(_STEP, lambda v: v >= 0, "give a checkpoint step (0 or more), or leave it out")
cli.check_flag(_DRAFT_TOKENS, lambda v: 1 <= v <= 16, "give an integer from 1 to 16")

MAX_SEQUENCES = 1024  # decoded together in one batch (prompts x --num_samples)
USAGE = "pass prompts with --prompt."


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  for path in _PROMPT_FILE.value:
    try:
      with open(path, encoding="utf-8") as f:
        prompts.append(f.read())
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read --prompt_file={path} ({getattr(e, 'strerror', None) or e}): pass a UTF-8 text file.") from None
  if any(not stop for stop in _STOP.value):
    raise UserError("--stop is empty: give the text a completion should end before.")
  if not prompts and _IMAGE.value is not None and not _INTERACTIVE.value:
    prompts = [""]  # the image alone
  if not prompts and not _INTERACTIVE.value:
    raise UserError("no prompt given: pass --prompt=TEXT, --prompt_file=PATH or --interactive.")
  if _SUFFIX.value is not None and _INTERACTIVE.value:
    raise UserError("--suffix goes with --prompt or --prompt_file, not --interactive: pass the text before the gap"
                    " as the prompt.")
  return prompts


def _check_infill(run) -> None:
  if _SUFFIX.value is not None and not getattr(run.objective, "infills", False):
    raise UserError(f"{run.workdir} was not trained to fill in the middle (task.kind={run.config.task.kind!r}), so it"
                    " cannot use --suffix: train one with configs/fim.py (task.kind='fim'), or leave --suffix out.")


def _image(run):
  """--image's pixels, fitted to the run's images (None without --image)."""
  if _IMAGE.value is None:
    return None
  vision = run.decoder.cfg.vision
  if vision is None:
    raise UserError(f"{run.workdir} reads no images (task.kind={run.config.task.kind!r}, no vision encoder): leave out"
                    " --image, or train a run that reads them with configs/reading.py.")
  if _SUFFIX.value is not None or _DRAFT.value:
    raise UserError("--image goes with --prompt alone: leave out --suffix and --draft_workdir.")
  from tpu_lm import storage
  from tpu_lm.tasks import reading

  try:
    with storage.open(_IMAGE.value, "rb") as f:
      data = f.read()
    return reading.decode_image(data, (vision.image_height, vision.image_width, vision.channels))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read --image={_IMAGE.value}: {getattr(e, 'strerror', None) or e}; pass a PNG or JPEG"
                    " file.") from None


def _prompt_ids(run, prompt: str, image=None) -> list[int]:
  if image is not None:
    from tpu_lm.tasks import reading

    return reading.image_prompt(run.decoder.cfg.vision.num_patches, run.encode_prompt(prompt))
  if _SUFFIX.value is None:
    return run.encode_prompt(prompt)
  return run.objective.infill_prompt(run.tokenizer, prompt, _SUFFIX.value)


def _end_id(run) -> int | None:
  return run.objective.end_id(run.tokenizer) if _SUFFIX.value is not None else None


def _check_counts(prompts: list[str]) -> None:
  if len(prompts) * _NUM_SAMPLES.value > MAX_SEQUENCES:
    raise UserError(f"{len(prompts)} prompts x --num_samples={_NUM_SAMPLES.value} is more than the {MAX_SEQUENCES}"
                    " sequences decoded in one batch: ask for fewer.")


def _sampling(seed: int):
  from tpu_lm.inference.sampling import Sampling

  s = Sampling(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, seed)
  s.check()
  return s


class CtrlC:
  """While entered, SIGINT (Ctrl-C) sets a flag that the decode loop's step callback
  reads (`self()`), so decoding ends cleanly at the next step. KeyboardInterrupt would
  surface only once the compiled loop, a C call, returned, with a traceback from
  wherever the main thread was. The signal reaches the callback's thread through a
  wakeup fd, written the moment it arrives; the Python-level handler itself runs only
  when the main thread is back in Python."""

  def __enter__(self):
    self._read, self._write = os.pipe()
    for fd in (self._read, self._write):
      os.set_blocking(fd, False)
    self.pressed = False
    self._handler = signal.signal(signal.SIGINT, self._on_sigint)
    self._wakeup = signal.set_wakeup_fd(self._write)
    return self

  def _on_sigint(self, *_):
    self.pressed = True

  def __call__(self) -> bool:
    if not self.pressed:
      try:
        self.pressed = signal.SIGINT in os.read(self._read, 64)
      except BlockingIOError:
        pass
    return self.pressed

  def __exit__(self, *_):
    signal.set_wakeup_fd(self._wakeup)
    signal.signal(signal.SIGINT, self._handler)
    os.close(self._read)
    os.close(self._write)


class _Text(StoppedText):
  """A row's text (StoppedText), which also knows whether Ctrl-C ended it."""

  interrupted = False

  def reason(self, completion, sampling) -> str:
    if self.ended:
      return "end of middle"
    if self.stops.stopped:
      return "stop sequence"
    if self.interrupted and len(completion.tokens) < sampling.max_new_tokens:
      return "interrupted"
    return completion.finish_reason


def _decode(run, jobs, stop: tuple[str, ...], interrupted, show=None, image=None):
  """Decodes (prompt, Sampling) pairs in one batch; each row ends at the step its text
  shows a stop sequence, every row at the step after Ctrl-C. `show(piece)` streams
  row 0's text; `image` (--image's pixels) is read before every prompt. Returns the
  Completions and their _Texts."""
  texts = [_Text(run.tokenizer, stop, _end_id(run)) for _ in jobs]
  eos = run.decoder.eos_id

  def on_step(_, tokens_B, done_B):
    now = interrupted()
    for text, token, done in zip(texts, tokens_B, done_B):
      if not done and token != eos:
        piece = text.push(int(token))
        text.interrupted = now and not text.stops.stopped
        if show:
          show(piece)
    return [now or text.stops.stopped for text in texts]

  pictures = {} if image is None else {"images": [image] * len(jobs)}  # (a draft model's decoder reads none)
  completions = run.decoder.generate([_prompt_ids(run, p, image) for p, _ in jobs], [s for _, s in jobs],
                                     on_step=on_step, **pictures)
  for text in texts:
    piece = text.finish()
    if show:
      show(piece)
  return completions, texts


def _show(piece: str) -> None:
  sys.stdout.write(piece)
  sys.stdout.flush()


def complete_one(run, prompt: str, sampling, stop: tuple[str, ...], image=None) -> bool:
  """Prints the prompt, then each new piece of text the moment its token exists.
  Returns whether Ctrl-C ended it."""
  _show(prompt)
  with CtrlC() as interrupted:
    [completion], [text] = _decode(run, [(prompt, sampling)], stop, interrupted, show=_show, image=image)
  _show(_SUFFIX.value or "")
  _show("\n[interrupted]\n" if interrupted.pressed else
        f"\n[{len(completion.tokens)} tokens, {text.reason(completion, sampling)}]\n")
  return interrupted.pressed


def complete_batch(run, jobs, stop: tuple[str, ...], image=None) -> bool:
  """Decodes (prompt, Sampling) pairs together and prints each completion in turn.
  Returns whether Ctrl-C ended them."""
  with CtrlC() as interrupted:
    completions, texts = _decode(run, jobs, stop, interrupted, image=image)
  for i, ((prompt, s), c, text) in enumerate(zip(jobs, completions, texts)):
    print(f"--- sample {i + 1}/{len(jobs)} (seed {s.seed}; {len(c.tokens)} tokens, {text.reason(c, s)}) ---")
    print(prompt + text.text + (_SUFFIX.value or ""), flush=True)
  if interrupted.pressed:
    print("[interrupted]", flush=True)
  return interrupted.pressed


def interactive(run, seed: int, stop: tuple[str, ...], image=None) -> None:
  """One prompt per line, each streamed; Ctrl-C ends a completion (or clears the line),
  Ctrl-D quits."""
  print("[interactive: one prompt per line (\\n for a newline); Ctrl-C stops a completion; Ctrl-D quits]",
        file=sys.stderr, flush=True)
  while True:
    try:
      line = input("> ")
    except EOFError:
      print(file=sys.stderr)
      return
    except KeyboardInterrupt:  # at the prompt: a fresh one, as a shell does
      print(file=sys.stderr)
      continue
    if not line.strip():
      continue
    try:
      complete_one(run, line.replace("\\n", "\n"), _sampling(seed), stop, image)
    except UserError as e:  # e.g. a prompt too long: say so and keep the model loaded
      print(f"error: {e}", file=sys.stderr, flush=True)
    seed = (seed + 1) % 2**32


def fill_masks() -> None:
  """--fill_mask: each text's masks, each with its candidates, best first."""
  from tpu_lm.inference import fill_mask, run_dir

  if _PROMPT.value or _PROMPT_FILE.value or _INTERACTIVE.value or _SUFFIX.value is not None:
    raise UserError("--fill_mask asks an encoder to fill masks: leave out --prompt, --prompt_file, --interactive and"
                    " --suffix, which sample a language model.")
  top_k = _TOP_K.value if flags.FLAGS["top_k"].present else 5
  if top_k < 1:
    raise UserError(f"--top_k={top_k} is invalid with --fill_mask: give the number of candidates to show (1 or more).")
  run = run_dir.load_encoder(_WORKDIR.value, step=_STEP.value)
  print(f"[loaded {run.workdir} at step {run.step}]", file=sys.stderr, flush=True)
  for text in _FILL_MASK.value:
    masks = fill_mask.fill(run, text, top_k)
    for m, candidates in enumerate(masks):
      print(f"--- {text!r}: mask {m + 1}/{len(masks)} ---")
      for c in candidates:
        print(f"{c.probability:.4f}  {c.token!r:<16} {c.sequence!r}" if len(masks) == 1 else
              f"{c.probability:.4f}  {c.token!r}")
    sys.stdout.flush()


def body() -> None:
  if _FILL_MASK.value:
    fill_masks()
    return
  stop = tuple(_STOP.value)
  try:
    prompts = _prompts()
    _check_counts(prompts)
    _sampling(_SEED.value)  # bad sampling flags fail before the model loads
    from tpu_lm.inference import run_dir

    run = run_dir.load(_WORKDIR.value, step=_STEP.value, tensor_parallel=_TENSOR.value)
    print(f"[loaded {run.workdir} at step {run.step}]", file=sys.stderr, flush=True)
    _check_infill(run)
    image = _image(run)
    if image is not None and not flags.FLAGS["max_new_tokens"].present:
      # The image's positions take most of a reading model's context: what is left, by default.
      longest = max((len(_prompt_ids(run, p, image)) for p in prompts), default=run.decoder.cfg.vision.num_patches + 1)
      flags.FLAGS.max_new_tokens = max(run.decoder.max_len - longest, 1)
    if _DRAFT.value:
      from tpu_lm.inference import speculative

      run.decoder = speculative.attach(run, _DRAFT.value, _DRAFT_TOKENS.value, tensor_parallel=_TENSOR.value)
      print(f"[draft {_DRAFT.value}: {_DRAFT_TOKENS.value} tokens a round]", file=sys.stderr, flush=True)
    run.decoder.check(1, _sampling(_SEED.value))  # what needs the model: top_k vs its vocabulary, its context
    interrupted = False
    if prompts:
      if len(prompts) * _NUM_SAMPLES.value == 1:
        interrupted = complete_one(run, prompts[0], _sampling(_SEED.value), stop, image)
      else:
        jobs = [(p, _sampling((_SEED.value + j) % 2**32)) for p in prompts for j in range(_NUM_SAMPLES.value)]
        interrupted = complete_batch(run, jobs, stop, image)
    if _DRAFT.value:
      total = run.decoder.total
      print(f"[speculative: {total.accepted} of {total.proposed} draft tokens accepted ({total.rate:.0%})]",
            file=sys.stderr, flush=True)
    if _INTERACTIVE.value:
      interactive(run, _SEED.value, stop, image)
    elif interrupted:
      sys.exit(130)  # as a shell reports a command ended by Ctrl-C
  except KeyboardInterrupt:  # Ctrl-C while loading or compiling, outside a decode
    print("\n[interrupted]", file=sys.stderr, flush=True)
    sys.exit(130)
