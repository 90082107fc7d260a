"""Attention kernels behind one function; all respect causality and packed segments."""

import jax
import jax.numpy as jnp


def segment_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] True where query t may attend to key s: s <= t, same document.

  Padding (segment 0) attends only to padding, so its rows are never empty.
  """
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxT[None] & same_BxTxT)[:, None]


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    segment_ids_BxT: jax.Array,
    implementation: str = "xla",
) -> jax.Array:
  """Causal, segment-masked attention; K kv heads serve N query heads (GQA)."""
  if implementation != "xla":
    raise ValueError(f"unknown attention implementation {implementation!r}")
  mask = segment_causal_mask(segment_ids_BxT)
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, implementation="xla"
  )


def cached_attention(
    q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, positions_BxT: jax.Array
) -> jax.Array:
  """Queries at absolute `positions` attend to cache slots 0..position (decoding).

  Slots past a row's position may hold stale or padding keys; they are masked.
  """
  slots_S = jnp.arange(k_BxSxKxH.shape[1])
  mask_Bx1xTxS = (slots_S[None, None, :] <= positions_BxT[:, :, None])[:, None]
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, implementation="xla"
  )
