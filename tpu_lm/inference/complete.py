"""A list of prompts completed at once, offline: every prompt through the
continuous-batching engine (engine.py), each cut at its own stop sequences.

For callers that hold the whole list up front (the evaluation harness's
generate_until, the code benchmark) rather than a stream of requests. A row
leaves the batch at the step its text shows one of its stop sequences, so short
answers free their slot for the next prompt at once.
"""

import dataclasses
import queue
import threading

from tpu_lm.errors import UserError
from tpu_lm.inference.engine import Engine, Job
from tpu_lm.inference.sampling import Sampling
from tpu_lm.inference.stops import StoppedText


@dataclasses.dataclass(frozen=True)
class Wanted:
  """One completion to make: its prompt (token ids as the model reads them, BOS
  included), how to sample it and the strings that end it (not included in the text)."""

  prompt_ids: list[int]
  sampling: Sampling
  stop: tuple[str, ...] = ()
  end_id: int | None = None  # a token that ends it as end-of-sequence does (an infill's end of middle)


def complete(run, wanted: list[Wanted], max_batch: int = 8, on_done=None) -> list[str]:
  """Each Wanted's completion text, in order, decoded `max_batch` rows at a time by
  continuous batching with the run's model (run_dir.Run). `on_done(index, text)`,
  when given, is called as each one ends (a progress bar). A prompt the model
  cannot take (too long for its context) is a UserError naming it."""
  for i, w in enumerate(wanted):
    try:
      run.decoder.check(len(w.prompt_ids), w.sampling)
    except UserError as e:
      raise UserError(f"completion {i}: {e}") from None
  if not wanted:
    return []
  events, cancelled = queue.Queue(), threading.Event()
  jobs = [Job(i, list(w.prompt_ids), w.sampling, events, cancelled, end_id=w.end_id) for i, w in enumerate(wanted)]
  texts = [StoppedText(run.tokenizer, tuple(w.stop)) for w in wanted]
  engine = Engine(run, max_batch)
  try:
    engine.submit(jobs)
    left = len(jobs)
    while left:
      kind, index, *rest = events.get()
      if kind == "token":
        if not texts[index].stops.stopped:
          texts[index].push(rest[0])
          if texts[index].stops.stopped:
            jobs[index].halt.set()  # leaves the batch at the next step boundary
      elif kind == "done":
        texts[index].finish()
        left -= 1
        if on_done:
          on_done(index, texts[index].text)
      else:  # ("error", index, (status, message)): the model failed this row
        raise UserError(f"completion {index} failed: {rest[0][1]}")
  finally:
    cancelled.set()
    engine.close(0.0)
  return [t.text for t in texts]
