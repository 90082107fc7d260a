"""Differentially private training (DP-SGD; Abadi et al. 2016) through jax-privacy.

What makes a step private:
- the batch is a Poisson sample: every training example (one packed row of
  data.seq_len tokens) joins each step independently with probability
  q = expected_batch / N (jax_privacy.batch_selection.CyclicPoissonSampling), and
  the compiled batch of data.global_batch_size rows is padded with empty rows; in
  a step that samples more, a uniform subset is kept (truncation), which the
  accountant charges (by default the expected batch leaves that at most 1e-6 a step);
- every example's gradient (of its own mean token loss) is clipped to L2 norm
  privacy.clip_norm (jax_privacy.clipping.clipped_grad), the clipped gradients are
  summed, Gaussian noise of standard deviation noise_multiplier x clip_norm is added
  to the sum, and the result is divided by the expected batch size;
- epsilon at privacy.delta is computed by the PLD accountant (dp_accounting, built
  as jax_privacy's DP-SGD analysis builds it: the truncated Poisson-subsampled
  Gaussian), composed over every step taken at the noise and sampling it was taken
  with: a ledger of segments kept in the checkpoint, so a resumed run (with more
  steps, another target or batch) charges the steps before it as they were, never
  less; logged with the training metrics and written to metrics.jsonl.
The unit of privacy is one training row: a document longer than a row is several
examples, and a string repeated k times enjoys k-fold group privacy at most.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError

PADDING = "dp_padding"  # batch field: True for the rows that only fill the compiled batch


@dataclasses.dataclass(frozen=True)
class DpOptions:
  clip_norm: float
  noise_multiplier: float
  expected_batch: float  # q x N: the clipped, noised sum is divided by this
  microbatch: int | None = None  # rows per vmapped chunk (gradient accumulation)
  batch_axes: tuple = ()  # mesh axes the batch is split over (the vmapped axis's sharding)


def loss_and_grads(split, batch, rng, *, model, task, dp: DpOptions):
  """(mean loss over the real examples, privatized gradient of the trained leaves
  `split.trained` (a list), metrics). An example's clipped norm is its gradient's
  over the trained leaves alone: frozen ones (a LoRA base model, optim.freeze) are
  constants here, neither differentiated nor noised."""
  padding_B = batch[PADDING]
  examples = {k: v for k, v in batch.items() if k != PADDING}
  # Inside the per-example function a batch has one row: its logical "act_batch"
  # axis must not be sharded (the vmapped axis is, over batch_axes).
  rules = tuple((name, None if name == "act_batch" else axes) for name, axes in nn.get_logical_axis_rules())

  def example_loss(trained, example_1xT, rng):  # clipped_grad keeps each example's batch axis (of 1)
    with nn.logical_axis_rules(rules):
      total, count, _ = task.loss(model, split.join(trained), example_1xT, rng)
    return total / jnp.maximum(count, 1)

  from jax_privacy import clipping

  grad_fn = clipping.clipped_grad(
      example_loss, l2_clip_norm=dp.clip_norm, batch_argnums=1, prng_argnum=2, return_values=True,
      return_grad_norms=True, microbatch_size=dp.microbatch, spmd_axis_name=dp.batch_axes or None)
  grad_sum, aux = grad_fn(split.trained, examples, rng, is_padding_example=padding_B)
  keys = jax.random.split(jax.random.fold_in(rng, 0x5EED), len(grad_sum))
  std = dp.noise_multiplier * dp.clip_norm
  grads = [(g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)) / dp.expected_batch
           for g, k in zip(grad_sum, keys)]
  real_B = (~padding_B).astype(jnp.float32)
  num_real = real_B.sum()
  loss = (aux.values * real_B).sum() / jnp.maximum(num_real, 1)
  clipped = ((aux.grad_norms > dp.clip_norm) * real_B).sum() / jnp.maximum(num_real, 1)
  return loss, grads, {"dp_examples": num_real, "dp_clipped_fraction": clipped}


# -- batch selection ----------------------------------------------------------------------------------------------


class PoissonLoader:
  """Poisson-sampled batches of a fixed set of examples, as the training loop's data
  iterator: `next`, `peek`, `close` and a checkpointable position (the steps drawn;
  the draws are a function of the seed, so a resumed run draws the same batches)."""

  def __init__(self, examples: dict, *, sampling_prob: float, num_steps: int, batch_rows: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    from jax_privacy import batch_selection

    self.examples = examples
    self.num_examples = len(next(iter(examples.values())))
    self.strategy = batch_selection.CyclicPoissonSampling(
        sampling_prob=sampling_prob, iterations=num_steps, truncated_batch_size=batch_rows)
    self.batch_rows, self.seed = batch_rows, seed
    per = batch_rows // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)
    self.drawn = 0
    self.truncated_steps = 0
    self._iter = None

  def _indices(self):
    if self._iter is None:
      self._iter = self.strategy.batch_iterator(self.num_examples, rng=self.seed)
      for _ in range(self.drawn):  # the same draws, up to where the run stopped
        next(self._iter)
    return next(self._iter)

  def _batch(self, indices) -> dict:
    padded = np.full(self.batch_rows, -1, np.int64)
    padded[:len(indices)] = indices
    mine = padded[self.rows]
    batch = {k: np.where((mine >= 0).reshape(-1, *[1] * (v.ndim - 1)), v[np.maximum(mine, 0)], 0)
             for k, v in self.examples.items()}
    batch[PADDING] = mine < 0
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    indices = self._indices()
    self.drawn += 1
    return self._batch(indices)

  def peek(self) -> dict:
    return self._batch(np.arange(min(self.batch_rows, self.num_examples)))

  def position(self) -> dict:
    return {"poisson_steps_drawn": self.drawn}

  def restore_position(self, saved: dict) -> None:
    if "poisson_steps_drawn" not in saved:
      raise UserError("the checkpoint was written by a run without privacy.dp: resume it with privacy.dp=False,"
                      " or start the private run in a new --workdir.")
    self.drawn, self._iter = int(saved["poisson_steps_drawn"]), None

  def close(self) -> None:
    pass


def materialize(split, *, seq_len: int, chunk_rows: int = 64) -> dict:
  """Every row of a split, packed in order once (the examples DP-SGD samples): a dict
  of [N, seq_len] arrays. The whole split is tokenized here, up front."""
  from tpu_lm.data import pipeline
  from tpu_lm.progress import Progress

  parts = []
  progress = Progress("DP-SGD: tokenizing the training split", every_s=15.0)
  for batch, done in pipeline.eval_batches(split, seq_len=seq_len, global_batch=chunk_rows,
                                           on_progress=progress.update):
    keep = batch["segment_ids"].max(axis=1) > 0
    parts.append({k: v[keep] for k, v in batch.items() if k not in ("num_bytes", "num_docs")})
    if done:
      break
  progress.done()
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- the run ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Private:
  """A private run's data iterator (the Poisson loader's batches) and its privacy
  ledger: the segments of steps taken so far, each at its own noise and sampling.
  Its checkpointed position holds both, so a resumed run charges every step at the
  noise it was actually taken with."""

  loader: PoissonLoader
  segments: list  # [Segment], in order of their start steps
  delta: float

  def metrics(self, step: int) -> dict:
    return {"epsilon": epsilon(self.segments, step, self.delta), "delta": self.delta}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.loader)

  def peek(self) -> dict:
    return self.loader.peek()

  def close(self) -> None:
    self.loader.close()

  def position(self) -> dict:
    return {**self.loader.position(), LEDGER: [dataclasses.asdict(seg) for seg in self.segments]}

  def restore_position(self, saved: dict) -> None:
    self.loader.restore_position(saved)


LEDGER = "privacy_segments"  # the checkpoint's data item: the privacy ledger


def prepare(setup, corpus, console, process_index: int = 0, process_count: int = 1, resumed=None) -> Private:
  """Materializes the training examples, sizes the Poisson sampling, calibrates or
  takes the noise (for the steps still to take, after those a resumed checkpoint
  records), switches `setup` to the private step; reports the plan. `resumed`:
  (step, the checkpoint's data item) of the checkpoint the run will resume from."""
  config, p = setup.config, setup.config.privacy
  rows = config.data.global_batch_size
  examples = materialize(corpus.train, seq_len=config.data.seq_len)
  n = len(examples["inputs"])
  expected = expected_batch_size(p.expected_batch_size, rows, n)
  if n < 2 * expected:
    raise UserError(f"the training split has {n} examples of {config.data.seq_len} tokens, fewer than twice the"
                    f" expected batch ({expected:g}): DP-SGD needs many more examples than a batch; use more data"
                    " or lower data.global_batch_size / privacy.expected_batch_size.")
  if p.delta >= 1.0 / n:
    raise UserError(f"privacy.delta={p.delta:g} is not below 1 / N = {1.0 / n:.3g} (N = {n} training examples): a"
                    " delta that large allows leaking an example outright; lower it.")
  steps = config.num_train_steps
  plan = (float(p.target_epsilon), float(p.noise_multiplier), int(steps))
  start, past = 0, []
  if resumed is not None:
    start, past = resumed[0], _ledger(resumed[1], n)
  new = Segment(start, float(p.noise_multiplier), n, expected, rows, plan)
  segments = extend(past, new, start, steps, p.target_epsilon, p.delta)
  noise = segments[-1].noise_multiplier
  setup.use_private_step(p.clip_norm, noise, segments[-1].expected_batch)
  loader = PoissonLoader(examples, sampling_prob=segments[-1].expected_batch / n, num_steps=steps, batch_rows=rows,
                         seed=config.seed, process_index=process_index, process_count=process_count)
  so_far = f"resumed at step {start} with epsilon {epsilon(segments, start, p.delta):.3f} spent; " if start else ""
  console(f"DP-SGD: {n:,} examples of {config.data.seq_len} tokens, Poisson rate q = {expected / n:.4g}"
          f" (expected batch {expected}, compiled {rows}; a step truncates with probability"
          f" {truncation_probability(expected, n, rows):.1e}), clip norm {p.clip_norm:g}; {so_far}noise multiplier"
          f" {noise:.4g}{' (calibrated)' if p.target_epsilon else ''}: epsilon {epsilon(segments, steps, p.delta):.3f}"
          f" at delta {p.delta:g} after {steps} steps (PLD accountant)")
  return Private(loader, segments, p.delta)


def _ledger(saved: dict, num_examples: int) -> list:
  """The segments a checkpoint's data item records. A checkpoint of a run written before
  the ledger existed has none: its steps are charged at this run's noise, as then."""
  if "poisson_steps_drawn" not in saved:
    raise UserError("the checkpoint was written by a run without privacy.dp: resume it with privacy.dp=False,"
                    " or start the private run in a new --workdir.")
  segments = [Segment(**{**s, "plan": tuple(s["plan"])}) for s in saved.get(LEDGER, [])]
  if segments and segments[-1].num_examples != num_examples:
    raise UserError(f"the training split now has {num_examples} examples and the checkpoint's privacy accounting"
                    f" is for {segments[-1].num_examples}: the guarantee holds for one dataset; resume with the data"
                    " the run was trained on, or start a new private run in a new --workdir.")
  return segments


# -- accounting ---------------------------------------------------------------------------------------------------


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


TRUNCATION_LIMIT = 1e-6  # per step: where truncation stops costing epsilon (below 0.1% of it)


def expected_batch_size(configured: int, batch_rows: int, num_examples: int) -> int:
  """The configured expected batch, or the largest one whose Poisson samples overflow
  the compiled batch with probability at most TRUNCATION_LIMIT a step (about half
  of it, for 32 rows). A larger expected batch is allowed (set it): the accountant
  charges the truncation, steeply once it is frequent (e.g. 24 of 32: 6x epsilon)."""
  if configured > 0:
    return int(configured)
  fits = [e for e in range(1, batch_rows + 1) if truncation_probability(e, num_examples, batch_rows) <= TRUNCATION_LIMIT]
  if not fits:
    raise UserError(f"data.global_batch_size={batch_rows} is too small for Poisson-sampled DP-SGD batches: raise it"
                    " (32 or more; DP-SGD wants large batches anyway), or set privacy.expected_batch_size.")
  return max(fits)


def truncation_probability(expected_batch: float, num_examples: int, batch_rows: int) -> float:
  """P(a step samples more than batch_rows examples): Binomial(N, q) tail."""
  from scipy.stats import binom

  return float(binom.sf(batch_rows, num_examples, expected_batch / num_examples))
