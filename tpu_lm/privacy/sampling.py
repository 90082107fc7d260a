"""Which examples a private step sees: every training example (one packed row of
data.seq_len tokens) joins each step independently with probability
q = expected_batch / N (Poisson sampling, jax_privacy.batch_selection
.CyclicPoissonSampling); the compiled batch is data.global_batch_size rows, padded
with empty rows, and a step that samples more keeps a uniform subset (truncation),
which the accountant charges.
"""

import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.privacy.gradients import PADDING

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
