"""A private run as the training loop sees it: its data iterator (Poisson-sampled
batches of the materialized training split) and its privacy ledger, prepared from
the config, the data and the checkpoint it resumes from.
"""

import dataclasses

from tpu_lm.errors import UserError
from tpu_lm.privacy.accounting import Segment, epsilon, extend
from tpu_lm.privacy.sampling import PoissonLoader, expected_batch_size, materialize, truncation_probability


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
