"""Multi-head / grouped-query self-attention: projections, rotary positions, the
kernel (see kernels.py), and the KV cache write used by decoding."""

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tpu_lm.model import kernels
from tpu_lm.model.layers import norm as layer_norm
from tpu_lm.model.layers import projection, rope

_ACT = ("act_batch", "act_length", "act_heads", "act_kv")
_CACHE = ("act_batch", "act_heads", "act_length", "act_kv")  # the KV cache: [B, K, S, H]


def norm(name: str, eps: float, dtype: str) -> nn.Module:
  """RMSNorm over the last (head) dimension, its scale shared by the heads."""
  return layer_norm("rmsnorm", use_bias=False, dtype=dtype, eps=eps, name=name)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool
  use_rope: bool
  rope_theta: float
  rope_scaling: tuple
  init_std: float
  out_init_std: float
  dtype: str
  implementation: str = "xla"
  mask: str = "causal"  # the mask kind (kernels.MASK_KINDS)
  # > 0: QK-norm (Dehghani et al. 2023; the speedrun): each head's queries and keys are
  # RMS-normalised with this epsilon, then scaled by a learned [H] vector, before RoPE:
  # attention logits stay bounded whatever the projections' growth.
  qk_norm_eps: float = 0.0

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache=None, prefix_BxT=None):
    """Returns (out, cache). Without a cache: attention of the mask kind within segments
    (`prefix_BxT`: the prefix kind's both-ways tokens).

    With a cache ({"k", "v"}: [B, K, S, H]) the new keys and values are first
    written at their absolute positions, then each query attends to every cached
    position up to its own (and, in a prefix, to the whole prefix); used for
    decoding, one document per row.
    """
    d = x_BxTxD.shape[-1]

    b, t = x_BxTxD.shape[:2]

    def proj(heads, axes, name, use_bias):
      y_BxTxNH = projection(
          heads * self.head_dim, ("embed", axes), std=self.init_std, use_bias=use_bias, dtype=self.dtype, name=name,
      )(x_BxTxD)
      return y_BxTxNH.reshape(b, t, heads, self.head_dim)

    q_BxTxNxH = checkpoint_name(proj(self.num_heads, "heads", "query", self.use_bias), "query")
    # No key bias: it adds q.b to every score of a query alike, which softmax
    # cancels, so its gradient is exactly zero and Adam would only amplify
    # rounding noise into it (and make parallel runs disagree on it).
    k_BxTxKxH = checkpoint_name(proj(self.num_kv_heads, "kv_heads", "key", False), "key")
    v_BxTxKxH = checkpoint_name(proj(self.num_kv_heads, "kv_heads", "value", self.use_bias), "value")
    if self.qk_norm_eps:
      q_BxTxNxH = norm("query_norm", self.qk_norm_eps, self.dtype)(q_BxTxNxH)
      k_BxTxKxH = norm("key_norm", self.qk_norm_eps, self.dtype)(k_BxTxKxH)
    if self.use_rope:
      q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, self.rope_theta, self.rope_scaling)
      k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, self.rope_theta, self.rope_scaling)
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, _ACT)
    if cache is None and self.is_mutable_collection("intermediates"):
      # Looking inside (tpu_lm.interpret): the reference path, whose probabilities
      # are recorded; ordinary training and decoding never take it.
      out_BxTxNxH, probs_BxNxTxS = kernels.attention_with_probs(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                                                self.mask, prefix_BxT)
      self.sow("intermediates", "attn_probs", probs_BxNxTxS)
    elif cache is None:
      out_BxTxNxH = kernels.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, self.implementation, self.mask, prefix_BxT
      )
    else:
      # The cache is [B, K, S, H] (slots after heads): attention then reads it as
      # batched matmuls over (row, kv head) with no transpose of the whole cache,
      # which in [B, S, K, H] cost two cache-sized copies per layer and step.
      rows_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]
      cache = {
          name: nn.with_logical_constraint(
              cache[name].at[rows_Bx1, :, positions_BxT].set(new.astype(cache[name].dtype)), _CACHE
          )
          for name, new in (("k", k_BxTxKxH), ("v", v_BxTxKxH))
      }
      out_BxTxNxH = kernels.cached_attention(q_BxTxNxH, cache["k"], cache["v"], positions_BxT,
                                             prefix_BxT if self.mask == "prefix" else None)
    out_BxTxNxH = checkpoint_name(nn.with_logical_constraint(out_BxTxNxH, _ACT), "attn_out")
    out_BxTxD = projection(
        d, ("heads", "embed"), std=self.out_init_std, use_bias=self.use_bias, dtype=self.dtype, name="out",
    )(out_BxTxNxH.reshape(b, t, self.num_heads * self.head_dim))
    return out_BxTxD, cache
