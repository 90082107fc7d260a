"""Sample from a trained run: python -m tpu_lm.generate --workdir=RUN --prompt "...".

Loads the newest checkpoint, its config and the run's tokenizer from RUN. One
completion streams to the terminal token by token; several (more prompts, or
--num_samples) are decoded together in one batch and printed in turn.
--interactive keeps the model loaded and reads one prompt per line.
"""

import sys

from tpu_lm.parallel import libtpu_env

if __name__ == "__main__":
  libtpu_env.quiet_where_no_tpu()

from absl import app, flags, logging  # noqa: E402

from tpu_lm import cli  # noqa: E402
from tpu_lm.errors import UserError, exit_with  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by python -m tpu_lm.main.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPT_FILE = flags.DEFINE_multi_string("prompt_file", [], "A text file whose whole content is one prompt; repeatable.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt (seeds seed, seed+1, ...).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Stop after this many new tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this much probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text.")
_STOP = flags.DEFINE_multi_string("stop", [], "End a completion before the first occurrence of this text; repeatable.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
_TENSOR = flags.DEFINE_integer("tensor_parallel", 1, "Devices to split the model over (heads, MLP, vocabulary).")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Read prompts from stdin, one per line, model kept loaded.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a user error.")
flags.mark_flags_as_required(["workdir"])


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
  if not prompts and not _INTERACTIVE.value:
    raise UserError("no prompt given: pass --prompt=TEXT, --prompt_file=PATH or --interactive.")
  return prompts


def _sampling(seed: int):
  from tpu_lm.inference.sampling import Sampling

  s = Sampling(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, seed)
  s.check()
  return s


def _stream_one(run, prompt: str, seed: int) -> None:
  """Prints the prompt, then each new piece of text the moment its token exists."""
  from tpu_lm.data.tokenizer import TextStream
  from tpu_lm.inference.stops import StopScanner

  stream, stops = TextStream(run.tokenizer), StopScanner(tuple(_STOP.value))
  sys.stdout.write(prompt)
  sys.stdout.flush()

  def on_step(_, tokens_B, done_B):
    if not done_B[0] and tokens_B[0] != run.decoder.eos_id:
      sys.stdout.write(stops.push(stream.push(tokens_B[0])))
      sys.stdout.flush()

  [completion] = run.decoder.generate([run.encode_prompt(prompt)], _sampling(seed), on_step=on_step)
  sys.stdout.write(stops.push(stream.finish()) + stops.finish())
  reason = "stop sequence" if stops.stopped else completion.finish_reason
  sys.stdout.write(f"\n[{len(completion.tokens)} tokens, {reason}]\n")
  sys.stdout.flush()


def _batch(run, prompts: list[str]) -> None:
  from tpu_lm.inference.stops import first_stop

  jobs = [(p, _SEED.value + j) for p in prompts for j in range(_NUM_SAMPLES.value)]
  completions = run.decoder.generate([run.encode_prompt(p) for p, _ in jobs], [_sampling(s) for _, s in jobs])
  for i, ((prompt, seed), c) in enumerate(zip(jobs, completions)):
    text, reason = run.tokenizer.decode(c.tokens), c.finish_reason
    cut = first_stop(text, tuple(_STOP.value))
    if cut is not None:
      text, reason = text[:cut], "stop sequence"
    print(f"--- sample {i + 1}/{len(jobs)} (seed {seed}; {len(c.tokens)} tokens, {reason}) ---")
    print(prompt + text, flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: pass prompts with --prompt.")
  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only
  try:
    if _NUM_SAMPLES.value < 1:
      raise UserError(f"--num_samples={_NUM_SAMPLES.value} is invalid: it must be at least 1.")
    prompts = _prompts()
    _sampling(_SEED.value)  # bad sampling flags fail before the model loads
    from tpu_lm.inference import run_dir

    run = run_dir.load(_WORKDIR.value, step=_STEP.value, tensor_parallel=_TENSOR.value)
    print(f"[loaded {run.workdir} at step {run.step}]", file=sys.stderr, flush=True)
    if prompts:
      if len(prompts) * _NUM_SAMPLES.value == 1:
        _stream_one(run, prompts[0], _SEED.value)
      else:
        _batch(run, prompts)
    if _INTERACTIVE.value:
      _interactive(run)
  except UserError as e:
    if _DEBUG.value:
      raise
    exit_with(str(e))


def _interactive(run) -> None:
  print("[interactive: one prompt per line (\\n for a newline); Ctrl-D to quit]", file=sys.stderr, flush=True)
  seed = _SEED.value
  while True:
    try:
      line = input("> ")
    except (EOFError, KeyboardInterrupt):
      print(file=sys.stderr)
      return
    if not line.strip():
      continue
    try:
      _stream_one(run, line.replace("\\n", "\n"), seed)
    except UserError as e:  # e.g. a prompt too long: say so and keep the model loaded
      print(f"error: {e}", file=sys.stderr, flush=True)
    seed += 1


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
