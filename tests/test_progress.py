"""Progress lines: rate-limited, with an ETA from the fraction done."""

import io

from tpu_lm.progress import Progress


def test_progress_prints_at_most_every_interval_with_an_eta():
  now = [0.0]
  out = io.StringIO()
  p = Progress("eval", every_s=10, clock=lambda: now[0], out=out)
  for t, f in ((5, 0.1), (12, 0.25), (15, 0.3), (30, 0.5), (40, 1.0)):
    now[0] = t
    p.update(f)
  p.done()
  lines = out.getvalue().splitlines()
  assert lines == ["eval: 25%, 0m12s elapsed, ETA 0m36s", "eval: 50%, 0m30s elapsed, ETA 0m30s", "eval: done in 0m40s"]
  quiet = io.StringIO()
  q = Progress("x", every_s=10, clock=lambda: 0.0, out=quiet)
  q.update(0.5)
  q.done()
  assert quiet.getvalue() == ""  # nothing printed for a quick step
