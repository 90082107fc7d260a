"""Sampling continuations from a model, for the samples printed after training.

Each new token runs the full forward pass over a fixed-length buffer inside one
compiled `fori_loop`: simple and exact, but quadratic in length, so meant for
short samples. Cached decoding for real generation belongs in its own module.
"""

import functools

import jax
import jax.numpy as jnp


def sample_logits(logits_BxV, rng, temperature: float, top_k: int):
  """Greedy when temperature is 0; else temperature sampling over the top k (0: all)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


def make_sampler(apply_fn, *, vocab_size: int, new_tokens: int, temperature: float, top_k: int):
  """A jitted (params, prompts [B, P], rng) -> [B, P + new_tokens]; the prompt part unchanged.

  Only ids below `vocab_size` (the tokenizer's) are sampled: the model's
  vocabulary is padded past it for sharding, and those ids mean nothing.
  """
  return jax.jit(functools.partial(
      _continue, apply_fn=apply_fn, vocab_size=vocab_size, new_tokens=new_tokens,
      temperature=temperature, top_k=top_k,
  ))


def _continue(params, prompts_BxP, rng, *, apply_fn, vocab_size, new_tokens, temperature, top_k):
  b, p = prompts_BxP.shape
  buf_BxT = jnp.concatenate([prompts_BxP, jnp.zeros((b, new_tokens), prompts_BxP.dtype)], axis=1)
  segments_BxT = jnp.ones_like(buf_BxT)
  positions_BxT = jnp.broadcast_to(jnp.arange(buf_BxT.shape[1]), buf_BxT.shape)

  def step(i, buf_BxT):
    logits_BxTxV = apply_fn({"params": params}, buf_BxT, segments_BxT, positions_BxT)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, i - 1, axis=1, keepdims=False)
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_size, logits_BxV, -jnp.inf)
    token_B = sample_logits(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k)
    return jax.lax.dynamic_update_index_in_dim(buf_BxT, token_B.astype(buf_BxT.dtype), i, axis=1)

  return jax.lax.fori_loop(p, p + new_tokens, step, buf_BxT)
