"""How one row is sampled: its settings, and the sampler run inside the decode loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one row is sampled. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def check(self) -> None:
    """Raises UserError naming the first setting out of range (or of the wrong type: a
    row's settings go into int32/float32/uint32 arrays, where a bad one would fail the batch)."""
    for name, ok, allowed in (
        ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", _is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
         f"a number from 0 to {MAX_TEMPERATURE} (0 is greedy)"),
        ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 keeps every token)"),
        ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 keeps every token)"),
        ("seed", _is_int(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
    ):
      if not ok:
        raise UserError(f"{name}={getattr(self, name)!r} is invalid: it must be {allowed}.")


MAX_TEMPERATURE = 100  # hotter is uniform sampling already; an infinite one would divide -inf by inf (NaN)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Completion:
  tokens: list[int]  # the new tokens, without the end-of-sequence token
  finish_reason: str  # "stop" (end-of-sequence, or ended by on_step) or "length" (max_new_tokens)
  # With a draft model (speculative.py), served: {"draft_tokens": k, "accepted": n, "proposed": m}.
  speculative: dict | None = None


def plan(samplings) -> tuple[str, int]:
  """The cheapest sampler that serves every row of a batch (static, so compiled
  per kind): ("greedy", 0) when no row samples; ("top_k", K) when every sampling
  row has a top_k (K bounds them: a partial sort of K, not of the vocabulary);
  ("plain", 0) when no sampling row filters, by top-k or top-p (no sort at all);
  else, rows that filter beside rows that do not, ("sort", 0)."""
  sampling = [s for s in samplings if s.temperature > 0]
  if not sampling:
    return "greedy", 0
  if all(s.top_k > 0 for s in sampling):
    return "top_k", max(s.top_k for s in sampling)
  if all(s.top_k == 0 and s.top_p >= 1 for s in sampling):
    return "plain", 0
  return "sort", 0


def sample_tokens(logits_BxV, seeds_B, step, temperature_B, top_k_B, top_p_B, *, kind: str = "sort",
                  max_top_k: int = 0):
  """One token per row: greedy where temperature is 0, else top-k/top-p sampling.

  `kind`/`max_top_k` (from `plan`) choose how much of the vocabulary is sorted;
  every kind draws the same token for a row as "sort" would (to float rounding of
  the nucleus sum where top_k and top_p are both set), so a row's tokens do not
  depend on the batch it is in. `step` (a scalar, or one per row) is the index of the
  new token being drawn: with the row's seed it picks the row's random numbers.
  """
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  if kind == "greedy":
    return greedy_B
  masked_BxV = filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B, kind=kind, max_top_k=max_top_k)
  steps_B = jnp.broadcast_to(step, seeds_B.shape)
  keys_B = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, steps_B)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, masked_BxV)
  return jnp.where(temperature_B == 0, greedy_B, sampled_B).astype(jnp.int32)


def filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B, *, kind: str = "sort", max_top_k: int = 0):
  """The logits a sampling row draws from: scaled by its temperature, with the tokens
  its top-k/top-p leave out at -inf (`kind`/`max_top_k` as in `sample_tokens`; not for
  "greedy"). Their softmax is the row's processed distribution (speculative decoding
  compares two models' in it)."""
  v = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
  if kind == "plain":
    masked_BxV = scaled_BxV
  else:
    if kind == "top_k":  # the K largest, descending: all a top-k row can keep
      sorted_BxK = jax.lax.top_k(scaled_BxV, min(max_top_k, v))[0]
    else:
      sorted_BxK = -jnp.sort(-scaled_BxV, axis=-1)  # descending
    kk = sorted_BxK.shape[-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, kk), kk)
    in_top_k_BxK = jnp.arange(kk)[None] < k_B[:, None]
    probs_BxK = jax.nn.softmax(jnp.where(in_top_k_BxK, sorted_BxK, -jnp.inf), axis=-1)
    # Nucleus: keep a sorted token while the mass before it is below top_p (the
    # first token is always kept); top_p 1 keeps all, whatever the rounding.
    below_BxK = (jnp.cumsum(probs_BxK, axis=-1) - probs_BxK) < top_p_B[:, None]
    keep_BxK = in_top_k_BxK & (below_BxK | (top_p_B[:, None] >= 1))
    threshold_B1 = jnp.take_along_axis(sorted_BxK, jnp.sum(keep_BxK, axis=-1, keepdims=True) - 1, axis=-1)
    masked_BxV = jnp.where(scaled_BxV >= threshold_B1, scaled_BxV, -jnp.inf)
  return masked_BxV
