"""Privacy accounting: epsilon at delta for the steps a run took, each charged at the
noise and sampling it was taken with (a ledger of segments, kept in the checkpoint),
and the noise that reaches a target epsilon.
"""

import dataclasses
import math

from tpu_lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Segment:
  """The steps from `start` on (to the next segment's start, or the current step),
  each a Poisson sample at rate expected_batch / num_examples truncated to batch_rows,
  noised at noise_multiplier. `plan` is what chose the noise (target epsilon,
  configured noise multiplier, num_train_steps): a resume with the same plan and
  sampling continues the segment, with its noise, bitwise as if never stopped."""

  start: int
  noise_multiplier: float
  num_examples: int
  expected_batch: int
  batch_rows: int  # the truncation limit
  plan: tuple = ()

  def event(self):
    import dp_accounting

    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=self.num_examples, sampling_probability=self.expected_batch / self.num_examples,
        truncated_batch_size=self.batch_rows, noise_multiplier=self.noise_multiplier)


def steps_per_segment(segments: list, step: int) -> list[int]:
  """How many of the first `step` steps each segment took."""
  ends = [s.start for s in segments[1:]] + [step]
  return [max(0, min(end, step) - s.start) for s, end in zip(segments, ends)]


def epsilon(segments: list, step: int, delta: float) -> float:
  """Epsilon at `delta` after `step` steps: the PLD composition of every step taken, at
  the noise and sampling it was taken with (the accountant jax_privacy's DP-SGD
  analysis uses: add-or-remove-one neighbours, the truncated Poisson-subsampled
  Gaussian). A 1e-3 grid of privacy-loss values (the default is 1e-4): ~0.2 s an
  epsilon, so it can be logged as training goes; the PLD stays a pessimistic (upper)
  bound, and moves epsilon by ~1e-4."""
  import dp_accounting

  counts = steps_per_segment(segments, step)
  if not any(counts):
    return 0.0
  if any(s.noise_multiplier <= 0 for s, c in zip(segments, counts) if c):
    return math.inf
  accountant = dp_accounting.pld.PLDAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
  for s, c in zip(segments, counts):
    if c:
      accountant.compose(s.event(), c)
  return float(accountant.get_epsilon(delta))


def extend(past: list, new: "Segment", start: int, end_step: int, target_epsilon: float, delta: float) -> list:
  """The ledger for training from `start` (the resumed step; 0 for a fresh run) to
  `end_step`: `past` (the checkpoint's segments) continued when `new` has the last
  one's plan and sampling, else with `new` from `start` on, its noise the configured
  one or, with a target, the smallest whose whole-run epsilon at `end_step` is at
  most the target. UserError when the steps taken leave no room under the target."""
  past = [s for s, c in zip(past, steps_per_segment(past, start)) if c]
  last = past[-1] if past else None
  same = last is not None and (last.plan, last.num_examples, last.expected_batch, last.batch_rows) == (
      new.plan, new.num_examples, new.expected_batch, new.batch_rows)
  if same or start >= end_step:  # nothing new to decide: training continues (or is over) as planned
    return past or [dataclasses.replace(new, noise_multiplier=_calibrated(past, new, end_step, target_epsilon, delta))]
  return past + [dataclasses.replace(new, noise_multiplier=_calibrated(past, new, end_step, target_epsilon, delta))]


def _calibrated(past: list, new: "Segment", end_step: int, target_epsilon: float, delta: float) -> float:
  if not target_epsilon:
    return new.noise_multiplier
  spent = epsilon(past, new.start, delta)
  # A plan calibrated to this target and carried out has spent the budget: what its
  # calibration left over is tolerance, and the noise that would squeeze more steps
  # into it would drown the gradient.
  done = bool(past) and past[-1].plan[0] == target_epsilon and new.start >= past[-1].plan[2]
  if spent >= target_epsilon or done:
    raise UserError(f"the {new.start} steps already taken spent epsilon {spent:.3f} of privacy.target_epsilon="
                    f"{target_epsilon:g}: training on to {end_step} steps would exceed it; raise"
                    " privacy.target_epsilon (epsilon is the whole run's, every step charged), or train no further.")
  return calibrate(lambda noise: epsilon(past + [dataclasses.replace(new, noise_multiplier=noise)], end_step, delta),
                   target_epsilon)


def calibrate(epsilon_at, target_epsilon: float, tol: float = 1e-3) -> float:
  """The smallest noise multiplier (to `tol`) whose `epsilon_at(noise)` is at most the
  target: a bracket doubled from [0, 1], then Brent's method, as jax_privacy calibrates."""
  from scipy import optimize

  def excess(noise):
    return epsilon_at(noise) - target_epsilon

  low, high = 0.0, 1.0
  while excess(high) > 0:
    if high > 1e6:
      raise UserError(f"no noise multiplier reaches privacy.target_epsilon={target_epsilon:g}: raise it.")
    low, high = high, 2 * high
  root = optimize.brentq(excess, low, high, xtol=tol)
  for noise in (root, root - tol, root + tol):  # brentq's root is within tol of the crossing, on either side
    if excess(noise) < 0:
      return float(noise)
  return float(optimize.bisect(excess, low, high, xtol=tol))
