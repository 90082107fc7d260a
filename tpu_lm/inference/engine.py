"""The serving engine: one thread owning the model, decoding every admitted sequence
together by continuous batching.

Sequences join the running batch at a step boundary (a prefill into a free slot of
slots.SlotDecoder) and leave it the step they end: end-of-sequence, their own
max_new_tokens, a stop sequence the server saw (`Job.halt`), or their client
gone (`Job.cancelled`). So a short request never waits for a long one, and each
row keeps its own sampling settings and limits. With a draft model
(speculative.SpeculativeSlots) a step gives each sequence 1 to k + 1 tokens, by its
own acceptance, and its Completion counts the draft tokens accepted and proposed.

It knows nothing of HTTP: a request is a list of `Job`s whose events go to a queue
the server reads (anything with `put`: serving/app.py hands them to its event loop),
in order: ("token", index, token id, logprobs or None) as each is drawn
(end-of-sequence too when logprobs are asked: the client sees every drawn token's
log-probability), then ("done", index, Completion), or ("error", index, (status,
message)). A Completion's tokens never include end-of-sequence (nor a
Job's own `end_id`).

A sequence that cannot start (settings out of range, a prompt that fails its
prefill) gets its own error and the others decode on: its settings are checked
and its prompt prefilled alone, before it joins a step. Only a failed step (the
device program shared by every row) fails the whole batch.
"""

import collections
import dataclasses
import logging
import math
import queue
import threading
import time

from tpu_lm.errors import UserError
from tpu_lm.inference.sampling import Completion
from tpu_lm.inference.slots import Row, SlotDecoder


@dataclasses.dataclass
class Job:
  """One sequence to decode; its events go to the queue of the HTTP request it belongs to."""

  index: int
  prompt_ids: list[int]
  sampling: object
  events: queue.Queue  # or anything with put(event), called from the engine's thread
  cancelled: threading.Event  # the whole request is abandoned (client gone, timeout)
  request_id: str = ""
  logprobs: bool = False  # report each token's log-probability and the top alternatives
  halt: threading.Event = dataclasses.field(default_factory=threading.Event)  # this sequence hit a stop sequence
  end_id: int | None = None  # a token that ends this sequence as end-of-sequence does (an infill's end of middle)
  image: object = None  # uint8 [H, W, C] read before the prompt (a vision model's; its positions lead prompt_ids)


class Busy(Exception):
  """The queue is full: the request is refused, to retry after `retry_after_s`."""

  def __init__(self, queued: int, retry_after_s: int):
    super().__init__(f"{queued} sequences are already waiting")
    self.queued, self.retry_after_s = queued, retry_after_s


class Closed(Exception):
  """The engine is shutting down and takes no more requests."""


@dataclasses.dataclass
class _Live:
  job: Job
  slot: int
  started: float
  tokens: list = dataclasses.field(default_factory=list)
  accepted: int = 0  # draft tokens accepted, of `proposed` (speculative decoding)
  proposed: int = 0


@dataclasses.dataclass
class ShutdownReport:
  finished: list[str]  # requests in flight at shutdown that completed within the grace period
  cancelled: list[str]  # requests in flight when the grace period ran out
  refused: list[str]  # requests still waiting for a slot: never started


class Engine:
  """Continuous batching over `max_batch` slots, at most `max_queue` sequences waiting
  for one (0: no bound): `submit` refuses the rest with Busy, so a flood of requests
  costs a quick refusal, not memory and latency."""

  def __init__(self, run, max_batch: int, max_queue: int = 0, slots=None):
    self.slots = slots if slots is not None else SlotDecoder(run.decoder, max_batch)
    self.eos_id = run.decoder.eos_id
    self.max_batch, self.max_queue = max_batch, max_queue
    self._cond = threading.Condition()
    self._waiting: collections.deque[Job] = collections.deque()
    self._live: dict[int, _Live] = {}  # slot -> sequence; touched by the engine thread only
    self._sequence_s = 1.0  # a moving average of a sequence's time in a slot: the Retry-After estimate
    self._closing_at = None  # the deadline for in-flight sequences once close() is called
    self._cancelled_at_close: set[str] = set()
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()

  def queued(self) -> int:
    return len(self._waiting)

  def running(self) -> int:
    return len(self._live)

  def submit(self, jobs: list[Job]) -> None:
    with self._cond:
      if self._closing_at is not None:
        raise Closed("the server is shutting down")
      waiting = len(self._waiting)
      if self.max_queue and waiting + len(jobs) > self.max_queue:
        # Slots free at about max_batch per sequence time: wait for the ones ahead, and this one.
        rounds = math.ceil((waiting + len(jobs)) / self.max_batch)
        raise Busy(waiting, max(1, math.ceil(rounds * self._sequence_s)))
      self._waiting.extend(jobs)
      self._cond.notify()

  def close(self, grace_s: float) -> ShutdownReport:
    """Stops admitting; sequences in flight get `grace_s` to finish, then are cancelled
    (their clients get a 503 saying so), as are the ones still waiting."""
    with self._cond:
      self._closing_at = time.monotonic() + grace_s
      refused = list(self._waiting)
      self._waiting.clear()
      in_flight = {live.job.request_id for live in list(self._live.values())}
      self._cond.notify()
    for job in refused:
      job.events.put(("error", job.index, (503, "the server shut down before this request started: retry it.")))
    self._thread.join()
    refused_ids = {job.request_id for job in refused}
    cancelled = self._cancelled_at_close | (in_flight & refused_ids)  # a request with n > 1 may be split
    return ShutdownReport(sorted(in_flight - cancelled), sorted(cancelled), sorted(refused_ids - in_flight))

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._waiting and not self._live and self._closing_at is None:
          self._cond.wait()
        if self._closing_at is not None and (not self._live or time.monotonic() > self._closing_at):
          break
        admitted = []
        free = (s for s in range(self.max_batch) if s not in self._live)
        while self._waiting and len(self._live) < self.max_batch:
          job = self._waiting.popleft()
          if not job.cancelled.is_set():
            live = _Live(job, next(free), time.monotonic())
            self._live[live.slot] = live
            admitted.append(live)
      try:
        self._advance(admitted)
      except Exception as e:  # keep serving: the sequences in flight get a 500
        logging.exception("decode failed")
        for live in self._live.values():
          live.job.events.put(("error", live.job.index, (500, f"decoding failed: {type(e).__name__}: {e}")))
        self._live.clear()
        self.slots.reset()
    for live in self._live.values():  # the grace period ran out
      self._cancelled_at_close.add(live.job.request_id)
      live.job.events.put(("error", live.job.index, (
          503, f"the server shut down before this request finished ({len(live.tokens)} tokens generated).")))
    self._live.clear()

  def _advance(self, admitted: list[_Live]) -> None:
    """One step boundary: drop what ended, make room, prefill who joined, step everyone."""
    for live in list(self._live.values()):
      if live.job.cancelled.is_set():
        del self._live[live.slot]
      elif live.job.halt.is_set():
        self._finish(live, "stop")
    # Checked before the cache is sized for them: their lengths and settings are the
    # request's, and a value out of range would otherwise fail the step of every row.
    admitted = [live for live in admitted if live.slot in self._live and self._checked(live)]
    if not self._live:
      return
    self.slots.fit(max(self._live) + 1,
                   max(len(v.job.prompt_ids) + v.job.sampling.max_new_tokens for v in self._live.values()))
    for live in admitted:
      try:
        self.slots.prefill(live.slot, live.job.prompt_ids, live.job.image)
      except Exception as e:  # this prompt's; the slot stays free
        logging.exception("prefill failed")
        self._fail(live, 500, f"the prompt could not be prefilled: {type(e).__name__}: {e}")
    if not self._live:
      return
    lives = list(self._live.values())
    out = self.slots.step([Row(v.slot, len(v.job.prompt_ids), len(v.tokens), v.job.sampling, v.job.logprobs)
                           for v in lives])
    for i, live in enumerate(lives):
      if out.counts is None:
        self._take(live, out, (i,))
        continue
      # A speculative step: each row its own number of tokens, until one ends it.
      live.accepted, live.proposed = live.accepted + int(out.accepted[i]), live.proposed + self.slots.k
      for j in range(int(out.counts[i])):
        if self._take(live, out, (i, j)):
          break

  def _take(self, live: _Live, out, at: tuple) -> bool:
    """Hands on the token at `at` of a step's output; returns whether it ended the sequence."""
    token = int(out.tokens[at])
    logprobs = None
    if live.job.logprobs:
      logprobs = (float(out.logprob[at]), [(int(t), float(lp)) for t, lp in zip(out.top_ids[at], out.top_logprobs[at])])
    if token == self.eos_id or token == live.job.end_id:
      if logprobs:  # drawn like any token: its log-probability is reported (scoring reads the last one)
        live.job.events.put(("token", live.job.index, token, logprobs))
      self._finish(live, "stop")
      return True
    live.tokens.append(token)
    live.job.events.put(("token", live.job.index, token, logprobs))
    if len(live.tokens) >= live.job.sampling.max_new_tokens:
      self._finish(live, "length")
      return True
    return False

  def _checked(self, live: _Live) -> bool:
    """Whether a joining sequence's prompt and settings are in range; if not, it fails alone."""
    try:
      self.slots.check(len(live.job.prompt_ids), live.job.sampling)
      return True
    except UserError as e:
      self._fail(live, 400, str(e))
    except Exception as e:
      logging.exception("a sequence's settings could not be checked")
      self._fail(live, 400, f"the sequence's settings could not be checked: {type(e).__name__}: {e}")
    return False

  def _fail(self, live: _Live, status: int, message: str) -> None:
    del self._live[live.slot]
    live.job.events.put(("error", live.job.index, (status, message)))

  def _finish(self, live: _Live, reason: str) -> None:
    del self._live[live.slot]
    self._sequence_s = 0.8 * self._sequence_s + 0.2 * (time.monotonic() - live.started)
    speculative = ({"draft_tokens": self.slots.k, "accepted": live.accepted, "proposed": live.proposed}
                   if live.proposed else None)
    live.job.events.put(("done", live.job.index, Completion(live.tokens, reason, speculative)))
