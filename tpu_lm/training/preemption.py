"""When to stop early and save: SIGTERM (preemption) or Ctrl-C.

Cloud TPU and most schedulers send SIGTERM some time before reclaiming a machine.
The training command's entry point creates a `Watch` first thing (`early_watch`,
before any slow import), so no signal ever finds the process unprepared:

- Before training starts there is nothing to save: the command exits 0 at once
  (`exit_early=True`, what `main` uses; the process skips interpreter teardown,
  which can crash when a signal lands mid-import or with compile threads running),
  or `Stopped` is raised (a BaseException, so no `except Exception` swallows it).
  Whatever was being written then (dataset, tokenizer) is written atomically.
- During training the handler only sets a flag. The loop asks `should_stop(step)`
  after every step; once it says yes, the loop saves a checkpoint of that step,
  waits for it to commit, and exits 0. A second signal during that save is
  reported and ignored (and were the process killed outright, Orbax's
  write-then-rename leaves the previous checkpoint intact).
- Several processes: `jax.distributed.initialize` (called after the Watch exists)
  installs JAX's preemption notifier for SIGTERM, which has all hosts agree on the
  step to stop at; `should_stop` asks it at every step on every host. Ctrl-C is
  left to its default there, since one host alone cannot stop the others.
"""

import os
import signal
import sys


class Stopped(BaseException):
  """A stop signal before training began: nothing to save, exit 0."""


class Watch:
  def __init__(self, exit_early: bool = False):
    self.reason: str | None = None
    self._exit_early = exit_early
    self._in_loop = False
    self._multi_process = False
    self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _on_signal(self, signum, _frame) -> None:
    name = signal.Signals(signum).name
    if self.reason is not None:
      print(f"\n{name} again: still saving the checkpoint (it is written atomically, so nothing is"
            " lost if this process is killed now)", file=sys.stderr, flush=True)
      return
    self.reason = name
    if not self._in_loop:
      if self._exit_early:
        print(f"stopped by {name} before training started: nothing to save", flush=True)
        sys.stderr.flush()
        os._exit(0)
      raise Stopped(name)
    print(f"\n{name}: finishing this step, then saving a checkpoint and exiting", file=sys.stderr, flush=True)

  def enter_loop(self) -> None:
    """From here on a signal means: finish the step, save it, stop."""
    import jax

    self._multi_process = jax.process_count() > 1
    if self._multi_process:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    self._in_loop = True

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = self.reason or "preemption (SIGTERM on some host)"
    return self.reason is not None

  def close(self) -> None:
    """Restores the previous handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


_EARLY: Watch | None = None


def early_watch() -> Watch:
  """The process's Watch that exits at once before training begins, made by the first
  call: the training command's entry point calls this before anything else."""
  global _EARLY
  if _EARLY is None:
    _EARLY = Watch(exit_early=True)
  return _EARLY
