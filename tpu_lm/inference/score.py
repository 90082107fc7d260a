"""One way to score text: the log-probability of each token of a sequence given the
tokens before it, under a model, batched and sharded as decoding is.

Every path that scores text goes through `token_logprobs`: the server's prompt
scoring (echo + logprobs), the memorization audit's log-perplexities and the
per-token log-probabilities `inspect` shows; they agree because they are this.
A sequence is ids as the model reads them (a prompt's BOS included, as
Run.encode_prompt makes it); token 0 has no context, so it has no log-probability.
The model reads every token but the last, so a sequence may be one token longer than
the model's context (max_len + 1 tokens: max_len predictions, as lm-eval windows text).
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.inference.decode import bucket


@dataclasses.dataclass(frozen=True)
class Scored:
  """One sequence's scores: entry i is about token i + 1 given tokens 0..i."""

  logprobs: np.ndarray  # [T - 1] log p(token i + 1 | tokens 0..i)
  top_ids: np.ndarray  # [T - 1, k] the k most likely tokens at each position, most likely first
  top_logprobs: np.ndarray  # [T - 1, k]


def left_to_right(model, positions_BxT):
  """A prefix LM's prefix when text is scored left to right: its first token (BOS) alone,
  so every prediction reads only what precedes it (None for other models)."""
  cfg = getattr(model, "cfg", None)
  return positions_BxT < 1 if getattr(cfg, "attention_mask", "") == "prefix" else None


def _score(params, tokens_BxT, real_BxT, targets_BxT, *, model, vocab_size: int, top: int):
  """Log-probabilities of targets_BxT[:, i] given tokens_BxT[:, :i + 1] (the model reads
  the inputs only: a sequence of max_len + 1 tokens is scored in full, max_len predictions)."""
  t = tokens_BxT.shape[1]
  positions_BxT = jnp.broadcast_to(jnp.arange(t), tokens_BxT.shape)
  logits_BxTxV = model.apply({"params": params}, tokens_BxT, real_BxT, positions_BxT,
                             prefix_BxT=left_to_right(model, positions_BxT))
  usable_V = jnp.arange(logits_BxTxV.shape[-1]) < vocab_size  # the model's vocab is padded for sharding
  logp_BxTxV = jax.nn.log_softmax(jnp.where(usable_V, logits_BxTxV, -jnp.inf), axis=-1)
  chosen_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  if not top:
    return chosen_BxT, None, None
  top_logprobs, top_ids = jax.lax.top_k(logp_BxTxV, top)
  return chosen_BxT, top_ids, top_logprobs


@functools.lru_cache(maxsize=16)
def _compiled(model, vocab_size: int):
  return jax.jit(functools.partial(_score, model=model, vocab_size=vocab_size), static_argnames=("top",))


def token_logprobs(model, params, sequences: list[list[int]], *, vocab_size: int, max_len: int, pad_id: int = 0,
                   top: int = 0, context=None, batch_multiple: int = 1) -> list[Scored]:
  """Scores each sequence (a list of ids) under `model` with `params`: what Scored
  holds, with the `top` most likely alternatives at each position (0: none). Rows are
  padded to shape buckets (powers of two), so a handful of compilations serve any
  request; `context` and `batch_multiple` as decoding's (a mesh: rows split over its
  data axis)."""
  if not sequences:
    return []
  for i, s in enumerate(sequences):
    if not 2 <= len(s) <= max_len + 1:
      raise UserError(f"sequence {i} has {len(s)} tokens: scoring needs 2 to {max_len + 1} (the model's context,"
                      " and the token after it).")
  b = bucket(len(sequences), 1)
  b += -b % batch_multiple
  t = bucket(max(len(s) for s in sequences) - 1, 16, max_len)  # the inputs: every token but the last
  tokens = np.full((b, t), pad_id, np.int32)
  targets = np.full((b, t), pad_id, np.int32)
  real = np.zeros((b, t), np.int32)
  for i, s in enumerate(sequences):
    tokens[i, :len(s) - 1], targets[i, :len(s) - 1], real[i, :len(s) - 1] = s[:-1], s[1:], 1
  with context() if context else contextlib.nullcontext():
    chosen, ids, alts = _compiled(model, vocab_size)(params, tokens, real, targets, top=top)
  chosen = np.asarray(chosen)
  ids = np.asarray(ids) if top else np.zeros((b, t, 0), np.int32)
  alts = np.asarray(alts) if top else np.zeros((b, t, 0), np.float32)
  return [Scored(chosen[i, :len(s) - 1], ids[i, :len(s) - 1], alts[i, :len(s) - 1]) for i, s in enumerate(sequences)]


def run_logprobs(run, sequences: list[list[int]], top: int = 0) -> list[Scored]:
  """token_logprobs with a loaded run's model (run_dir.Run: its parameters, mesh and
  quantized kernels, what it decodes with)."""
  d = run.decoder
  return token_logprobs(d.model, d.params, sequences, vocab_size=d.vocab_size, max_len=d.max_len, pad_id=d.pad_id,
                        top=top, context=d.context, batch_multiple=d.batch_multiple)
