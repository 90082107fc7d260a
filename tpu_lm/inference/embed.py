"""Text embeddings: a run's final hidden states (normed, as the head reads them) pooled
into one unit-length vector per input, as OpenAI's embeddings are. A decoder's are the
mean over its tokens (its last token's state sees the whole text too, but the mean is
the steadier summary for a model not trained to embed); an encoder's, the mean or its
first (CLS) token's, as the server is told (`serve --embedding_pooling`).

Inputs are padded to a few shapes (powers of two in length and count), so a server
compiles a handful of programs, not one per request."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.inference import score
from tpu_lm.tasks import classification

POOLINGS = ("mean", "first", "last")


def _bucket(n: int, cap: int, least: int = 8) -> int:
  """The power of two >= n (at least `least`), at most `cap`."""
  return min(max(least, 1 << (max(n, 1) - 1).bit_length()), cap)


class Embedder:
  def __init__(self, model, params, max_len: int, pad_id: int, pooling: str = "mean", max_batch: int = 64):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling {pooling!r}: use one of {POOLINGS}")
    self.params, self.max_len, self.pad_id, self.pooling, self.max_batch = params, max_len, pad_id, pooling, max_batch
    self._pooled = jax.jit(functools.partial(_pooled, model, pooling))

  def embed(self, sequences: list[list[int]]) -> np.ndarray:
    """[N, D] float32 unit vectors, one per id sequence (each at most max_len ids)."""
    out = []
    for start in range(0, len(sequences), self.max_batch):
      chunk = sequences[start:start + self.max_batch]
      t = _bucket(max(len(s) for s in chunk), self.max_len)
      b = _bucket(len(chunk), self.max_batch, least=1)
      tokens = np.full((b, t), self.pad_id, np.int32)
      lengths = np.zeros(b, np.int32)
      for i, ids in enumerate(chunk):
        tokens[i, :len(ids)], lengths[i] = ids, len(ids)
      out.append(np.asarray(self._pooled(self.params, jnp.asarray(tokens), jnp.asarray(lengths)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _pooled(model, pooling: str, params, tokens_BxT, lengths_B):
  t = tokens_BxT.shape[1]
  real_BxT = jnp.arange(t)[None] < lengths_B[:, None]
  segments_BxT = real_BxT.astype(jnp.int32)  # 0: padding, attended by nothing
  positions_BxT = jnp.broadcast_to(jnp.arange(t), tokens_BxT.shape)
  hidden_BxTxD = model.apply({"params": params}, tokens_BxT, segments_BxT, positions_BxT, method="hidden",
                             prefix_BxT=score.left_to_right(model, positions_BxT)).astype(jnp.float32)
  pooled_BxD = classification.pool(hidden_BxTxD, real_BxT.astype(jnp.float32), pooling)
  return pooled_BxD / jnp.maximum(jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True), 1e-12)
