"""When to stop early and save: SIGTERM (preemption) or Ctrl-C.

Cloud TPU and most schedulers send SIGTERM some time before reclaiming a machine.
The training loop asks `should_stop(step)` after every step; once it says yes,
the loop saves a checkpoint of that step, waits for it to commit, and exits 0.

One process: a handler for SIGTERM and SIGINT sets a flag. A second signal while
the checkpoint is being written is reported and ignored: the save finishes (and
were the process killed outright, Orbax's write-then-rename leaves the previous
checkpoint intact).

Several processes: JAX's preemption sync manager (started by
`jax.distributed.initialize`) catches SIGTERM on any host and has all hosts
agree on the same step to stop at; `reached_preemption_sync_point` must then be
called on every host at every step, which `should_stop` does.
"""

import signal
import sys

import jax
from jax.experimental import multihost_utils


class Watch:
  def __init__(self):
    self.reason: str | None = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, _frame) -> None:
    name = signal.Signals(signum).name
    if self.reason is None:
      self.reason = name
      print(f"\n{name}: finishing this step, then saving a checkpoint and exiting", file=sys.stderr, flush=True)
    else:
      print(f"\n{name} again: still saving the checkpoint (it is written atomically, so nothing is"
            " lost if this process is killed now)", file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.reason = self.reason or "preemption (SIGTERM on some host)"
    return self.reason is not None

  def close(self) -> None:
    """Restores the previous handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
