"""The serving engine: one thread owning the model, decoding queued requests in batches.

It knows nothing of HTTP: a request is a list of `Job`s whose events (tokens as
they come, then the completion, or an error) go to a queue the transport reads.
"""

import dataclasses
import logging
import math
import queue
import threading
import time


@dataclasses.dataclass
class Job:
  """One sequence to decode; its events go to the queue of the HTTP request it belongs to."""

  index: int
  prompt_ids: list[int]
  sampling: object
  events: queue.Queue
  cancelled: threading.Event


class Busy(Exception):
  """The queue is full: the request is refused, to retry after `retry_after_s`."""

  def __init__(self, queued: int, retry_after_s: int):
    super().__init__(f"{queued} sequences are already waiting")
    self.queued, self.retry_after_s = queued, retry_after_s


class Engine:
  """One thread owning the model: drains the queue into batches and decodes them.

  At most `max_queue` sequences wait (0: no bound); `submit` refuses the rest with
  Busy, so a flood of requests costs a quick refusal, not memory and latency.
  """

  def __init__(self, run, max_batch: int, max_queue: int = 0):
    self.run, self.max_batch, self.max_queue = run, max_batch, max_queue
    self._queue: queue.Queue = queue.Queue()
    self._admit = threading.Lock()  # the check and the enqueue as one step
    self._batch_s = 1.0  # how long the last batch took: the estimate behind Retry-After
    threading.Thread(target=self._loop, name="engine", daemon=True).start()

  def queued(self) -> int:
    return self._queue.qsize()

  def submit(self, jobs: list[Job]) -> None:
    with self._admit:
      waiting = self._queue.qsize()
      if self.max_queue and waiting + len(jobs) > self.max_queue:
        # The queue drains a batch per `_batch_s`: that long per max_batch waiting, plus this one.
        batches = math.ceil((waiting + len(jobs)) / self.max_batch)
        raise Busy(waiting, max(1, math.ceil(batches * self._batch_s)))
      for job in jobs:
        self._queue.put(job)

  def _loop(self) -> None:
    while True:
      jobs = [self._queue.get()]
      while len(jobs) < self.max_batch:
        try:
          jobs.append(self._queue.get_nowait())
        except queue.Empty:
          break
      jobs = [j for j in jobs if not j.cancelled.is_set()]
      if jobs:
        start = time.monotonic()
        self._decode(jobs)
        self._batch_s = time.monotonic() - start

  def _decode(self, jobs: list[Job]) -> None:
    def on_step(_, tokens_B, done_B):
      for job, token, done in zip(jobs, tokens_B, done_B):
        if not done and token != self.run.decoder.eos_id:
          job.events.put(("token", job.index, int(token)))

    try:
      completions = self.run.decoder.generate([j.prompt_ids for j in jobs], [j.sampling for j in jobs], on_step)
    except Exception as e:  # keep serving: the requests in this batch get a 500
      logging.exception("decode failed")
      for job in jobs:
        job.events.put(("error", job.index, f"decoding failed: {type(e).__name__}: {e}"))
      return
    for job, c in zip(jobs, completions):
      job.events.put(("done", job.index, c))
