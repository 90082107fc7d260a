"""How one row is sampled: its settings, and the sampler run inside the decode loop."""

import dataclasses

import jax
import jax.numpy as jnp

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
    for name, ok, allowed in (
        ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", self.temperature >= 0, "a number >= 0 (0 is greedy)"),
        ("top_k", self.top_k >= 0, "an integer >= 0 (0 keeps every token)"),
        ("top_p", 0 < self.top_p <= 1, "a number in (0, 1] (1 keeps every token)"),
        ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
    ):
      if not ok:
        raise UserError(f"{name}={getattr(self, name)!r} is invalid: it must be {allowed}.")


@dataclasses.dataclass(frozen=True)
class Completion:
  tokens: list[int]  # the new tokens, without the end-of-sequence token
  finish_reason: str  # "stop" (end-of-sequence) or "length" (max_new_tokens)


def sample_tokens(logits_BxV, seeds_B, step, temperature_B, top_k_B, top_p_B):
  """One token per row: greedy where temperature is 0, else top-k/top-p sampling."""
  v = logits_BxV.shape[-1]
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
  in_top_k_BxV = jnp.arange(v)[None] < k_B[:, None]
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
  # Nucleus: keep a sorted token while the mass before it is below top_p (the
  # first token is always kept).
  keep_BxV = in_top_k_BxV & ((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p_B[:, None])
  threshold_B1 = jnp.take_along_axis(sorted_BxV, jnp.sum(keep_BxV, axis=-1, keepdims=True) - 1, axis=-1)
  masked_BxV = jnp.where(scaled_BxV >= threshold_B1, scaled_BxV, -jnp.inf)
  keys_B = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds_B)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, masked_BxV)
  return jnp.where(temperature_B == 0, greedy_B, sampled_B).astype(jnp.int32)
