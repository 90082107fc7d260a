"""Attention kernels behind one function; all honour the mask kind and packed segments.

Mask kinds (an objective chooses one; the model runs it everywhere: training, the
reference path, prefill and decode):
- causal: a token attends to itself and the tokens before it in its document;
- prefix: causal, except that the tokens of a document's prefix (the first n,
  marked by `prefix_BxT`) attend to each other both ways (a prefix LM);
- bidirectional: a token attends to every token of its document (an encoder).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


MASK_KINDS = ("causal", "prefix", "bidirectional")


def attention_mask(segment_ids_BxT: jax.Array, kind: str = "causal", prefix_BxT: jax.Array | None = None) -> jax.Array:
  """[B, 1, T, T] True where query t may attend to key s: the same document, and s <= t
  (causal), or s <= t or both in the prefix (prefix), or any s (bidirectional).

  Padding (segment 0) attends only to padding, so its rows are never empty.
  """
  t = segment_ids_BxT.shape[1]
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if kind == "bidirectional":
    return same_BxTxT[:, None]
  visible_BxTxT = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
  if kind == "prefix":
    visible_BxTxT = visible_BxTxT | (prefix_BxT[:, :, None] & prefix_BxT[:, None, :])
  return (visible_BxTxT & same_BxTxT)[:, None]


def segment_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """The causal kind's mask (attention_mask)."""
  return attention_mask(segment_ids_BxT)


IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def resolve(implementation: str, platform: str, dtype: str = "bfloat16", seq_len: int = 128,
            mask: str = "causal") -> str:
  """`auto` -> the fastest kernel for `platform`: cuDNN flash attention on GPU (it
  takes only 16-bit inputs: float32 compute stays on XLA), the Pallas splash kernel
  on TPU (for lengths it tiles, and masks fixed in advance: not a prefix that varies
  by row), plain XLA elsewhere. Other names pass through."""
  if implementation != "auto":
    return implementation
  if platform in ("gpu", "cuda"):
    return "cudnn" if dtype in ("bfloat16", "float16") else "xla"
  if platform == "tpu" and splash_fits(seq_len) and mask != "prefix":
    return "splash"
  return "xla"


def splash_fits(seq_len: int) -> bool:
  return seq_len <= 128 or seq_len % 128 == 0


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    segment_ids_BxT: jax.Array,
    implementation: str = "xla",
    mask: str = "causal",
    prefix_BxT: jax.Array | None = None,
) -> jax.Array:
  """Segment-masked attention of mask kind `mask`; K kv heads serve N query heads (GQA)."""
  if implementation == "xla":
    dtype = q_BxTxNxH.dtype
    if dtype == jnp.float16:
      # Scores accumulate in float32, a float16 x float16 -> float32 product some
      # backends (CPU) lack; float16 runs use cuDNN on GPU anyway.
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (x.astype(jnp.float32) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
    return _xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, mask, prefix_BxT).astype(dtype)
  if implementation == "cudnn":
    if mask == "causal":
      # is_causal lets cuDNN skip the blocks above the diagonal; the document mask
      # on top is applied inside the same fused kernel.
      same_doc = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
      return jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=same_doc, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                        mask=attention_mask(segment_ids_BxT, mask, prefix_BxT), implementation="cudnn")
  if implementation in ("splash", "splash_interpret"):
    return _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, mask, interpret=implementation == "splash_interpret")
  raise ValueError(f"unknown attention implementation {implementation!r}")


def attention_with_probs(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, mask: str = "causal", prefix_BxT=None):
  """The reference path: plain softmax attention that also returns its probabilities
  [B, N, T, S] (float32), for looking inside a model (the fused kernels never form
  them). Same function as the kernels up to rounding."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  q_BxTxKxGxH = (q_BxTxNxH.astype(jnp.float32) * h**-0.5).reshape(b, t, kv, n // kv, h)
  scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxTxKxH.astype(jnp.float32))
  mask_Bx1x1xTxS = attention_mask(segment_ids_BxT, mask, prefix_BxT)[:, :, None]
  scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1)
  out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxTxKxH.astype(jnp.float32))
  return out_BxTxKxGxH.reshape(b, t, n, h).astype(q_BxTxNxH.dtype), probs_BxKxGxTxS.reshape(b, n, t, t)


def _xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, mask="causal", prefix_BxT=None):
  """Segment attention in plain XLA ops, cheaper than `jax.nn.dot_product_attention`'s
  on a CPU (the GPT-2 small train step: 143 -> 122 ms on 2 cores) for two reasons:

  - query blocks (causal masks): the queries are cut into up to 4 blocks (of >= 64),
    and block i scores only the keys up to its own end, skipping the tiles above the
    diagonal that causality masks anyway (4 blocks: 62.5% of the T x T scores);
  - normalization after the value product: exp(scores - max) multiplies the values
    and the [T, H] result is divided by the row sums, instead of dividing the
    [T, T] probabilities (and differentiating through that division).

  The same function as softmax attention up to float rounding.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  q_BxTxKxGxH = (q_BxTxNxH * h**-0.5).reshape(b, t, kv, n // kv, h)
  mask_Bx1x1xTxT = attention_mask(segment_ids_BxT, mask, prefix_BxT)[:, :, None]
  # A prefix (or no causality) lets a query see keys past its block's end: one block then.
  blocks = next((nb for nb in (4, 2) if t % nb == 0 and t // nb >= 64), 1) if mask == "causal" else 1
  size = t // blocks
  outs = []
  for i in range(blocks):
    lo, hi = i * size, (i + 1) * size  # queries [lo, hi) see keys [0, hi)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH[:, lo:hi], k_BxTxKxH[:, :hi],
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask_Bx1x1xTxT[..., lo:hi, :hi], scores, jnp.finfo(jnp.float32).min)
    # Every row sees at least its own position, so the max is finite and the sum > 0.
    exp_BxKxGxTxS = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    sums_BxTxKxG = jnp.moveaxis(exp_BxKxGxTxS.sum(-1), 3, 1)
    out = jnp.einsum("bkgts,bskh->btkgh", exp_BxKxGxTxS.astype(v_BxTxKxH.dtype), v_BxTxKxH[:, :hi],
                     preferred_element_type=jnp.float32)
    outs.append(out / sums_BxTxKxG[..., None])
  out_BxTxKxGxH = jnp.concatenate(outs, axis=1) if blocks > 1 else outs[0]
  return out_BxTxKxGxH.reshape(b, t, n, h)


def _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, mask: str = "causal", *, interpret: bool):
  """The TPU Pallas splash-attention kernel, one call per (row, kv head), with a causal
  or a full (bidirectional) mask; its masks are fixed when it is built, so a prefix
  that varies by row runs on XLA (resolve).

  A Pallas kernel is not partitioned by XLA, so under a mesh it runs inside
  shard_map: each device takes its rows (batch axes) and its heads (tensor axis).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  t, n, h = q_BxTxNxH.shape[1:]
  kv = k_BxTxKxH.shape[2]
  mesh = jax.sharding.get_abstract_mesh()
  spec = P(None, None, None, None)
  if mesh is not None and not mesh.empty:
    spec = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", "act_kv"))
    if q_BxTxNxH.shape[0] % _axis_size(mesh, spec[0]):  # e.g. the one-row batch of init
      spec = P(None, *spec[1:])
  heads_per_device = n // _axis_size(mesh, spec[2])
  kv_per_device = kv // _axis_size(mesh, spec[2])
  # The largest standard tile that divides the length (short sequences: one tile).
  if not splash_fits(t):
    raise ValueError(f"the splash kernel needs a sequence length divisible by 128 or below 128, not {t}")
  block = next((b for b in (512, 256, 128) if t % b == 0), t)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
      block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
  )
  if mask not in ("causal", "bidirectional"):
    raise ValueError(f"the splash kernel runs causal and bidirectional masks, not {mask!r}")
  group = heads_per_device // kv_per_device
  head_mask = masks.CausalMask((t, t)) if mask == "causal" else masks.FullMask((t, t))
  kernel = splash.make_splash_mqa_single_device(
      masks.MultiHeadMask([head_mask] * group), block_sizes=sizes, interpret=interpret
  )

  def local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, seg_BxT):
    b = q_BxTxNxH.shape[0]
    q = (q_BxTxNxH * h**-0.5).reshape(b, t, kv_per_device, group, h).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BxTxKxH, v_BxTxKxH))  # [B, K, T, H]
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads, segments shared
    per_row = jax.vmap(lambda q, k, v, s: per_kv_head(q, k, v, splash.SegmentIds(s, s)))
    out_BxKxGxTxH = per_row(q, k, v, seg_BxT)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_per_device * group, h)

  if spec == P(None, None, None, None):
    return local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
  qkv_spec = P(spec[0], None, spec[2], None)
  return jax.shard_map(
      local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(spec[0], None)), out_specs=qkv_spec,
      check_vma=False,
  )(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


def _axis_size(mesh, axes) -> int:
  if axes is None or mesh is None or mesh.empty:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def cached_attention(
    q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, positions_BxT: jax.Array,
    prefix_BxT: jax.Array | None = None,
) -> jax.Array:
  """Queries at absolute `positions` attend to cache slots 0..position (decoding); a
  query of the prefix (`prefix_BxT`, a prefix LM's prompt at prefill) also to every
  slot of the prefix, which begins each row.

  Slots past a row's position may hold stale or padding keys; they are masked.
  Two batched matmuls over (row, kv head), the G query heads of a kv head and the
  T queries as rows: nothing cache-sized is transposed or copied.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  q_BxKxGTxH = q_BxTxNxH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, h)
  scores_BxKxGTxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGTxH, k_BxKxSxH, preferred_element_type=jnp.float32)
  scores_BxKxGTxS = scores_BxKxGTxS * h**-0.5
  visible_BxTxS = jnp.arange(s)[None, None, :] <= positions_BxT[:, :, None]
  if prefix_BxT is not None:
    prefix_len_B = prefix_BxT.sum(1)
    visible_BxTxS = visible_BxTxS | (prefix_BxT[:, :, None] & (jnp.arange(s)[None, None, :] < prefix_len_B[:, None, None]))
  visible_Bx1xGTxS = jnp.tile(visible_BxTxS, (1, n // kv, 1))[:, None]
  scores_BxKxGTxS = jnp.where(visible_Bx1xGTxS, scores_BxKxGTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGTxS = jax.nn.softmax(scores_BxKxGTxS, axis=-1).astype(v_BxKxSxH.dtype)
  out_BxKxGTxH = jnp.einsum("bkqs,bksh->bkqh", probs_BxKxGTxS, v_BxKxSxH, preferred_element_type=jnp.float32)
  out_BxKxGTxH = out_BxKxGTxH.astype(q_BxTxNxH.dtype)
  return out_BxKxGTxH.reshape(b, kv, n // kv, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
