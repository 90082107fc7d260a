"""Progress lines with an ETA for the long-running steps that are not training (which
logs its own): evaluation, conversion, tokenizing a split; sweeps print per trial.

  p = Progress("eval", every_s=10)
  for ...: p.update(fraction_done)   # prints at most every `every_s` seconds
  p.done()                           # one closing line, only if any was printed
"""

import sys
import time


def format_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
  def __init__(self, what: str, every_s: float = 10.0, clock=time.monotonic, out=None, enabled: bool = True):
    self.what, self.every_s, self.clock, self.enabled = what, every_s, clock, enabled
    self.out = out or sys.stdout
    self.start = self.last = clock()
    self.printed = False

  def update(self, fraction: float, detail: str = "") -> None:
    now = self.clock()
    if not self.enabled or now - self.last < self.every_s or not 0 < fraction < 1:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed * (1 - fraction) / fraction
    print(f"{self.what}: {100 * fraction:.0f}%{' (' + detail + ')' if detail else ''}, {format_seconds(elapsed)}"
          f" elapsed, ETA {format_seconds(eta)}", file=self.out, flush=True)
    self.printed = True

  def done(self, detail: str = "") -> None:
    if self.printed:
      print(f"{self.what}: done{' (' + detail + ')' if detail else ''} in {format_seconds(self.clock() - self.start)}",
            file=self.out, flush=True)
