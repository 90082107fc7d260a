"""A decoder-only Transformer in Flax Linen: GPT-2 and Llama families by config.

GPT-2: learned positions, LayerNorm, GELU MLP, biases. Llama: rotary positions,
RMSNorm, SwiGLU MLP, grouped-query attention, no biases. Parameters are float32
and carry logical axis names; `ModelConfig.dtype` is the compute dtype.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tpu_lm import attention

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep the attention projections and output (tagged below with checkpoint_name);
    # recompute norms and the MLP: most of the memory saving of "full" for a
    # fraction of its recompute.
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int = 256
  norm: str = "layernorm"
  position: str = "learned"
  rope_theta: float = 10_000.0
  mlp: str = "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  init_std: float = 0.02
  attention: str = "xla"  # attention kernel, see attention.py


def _init(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=1e-6, dtype=cfg.dtype, scale_init=scale, name=name)
  return nn.LayerNorm(
      epsilon=1e-5, dtype=cfg.dtype, use_bias=cfg.use_bias, scale_init=scale,
      bias_init=_zeros(("norm",)), name=name,
  )


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  h = x_BxTxNxH.shape[-1]
  freqs_F = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * freqs_F
  sin, cos = jnp.sin(angles_BxTxF)[:, :, None], jnp.cos(angles_BxTxF)[:, :, None]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool
  use_rope: bool
  rope_theta: float
  init_std: float
  out_init_std: float
  dtype: str
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache=None):
    """Returns (out, cache). Without a cache: causal attention within segments.

    With a cache ({"k", "v"}: [B, S, K, H]) the new keys and values are first
    written at their absolute positions, then each query attends to every cached
    position up to its own; used for decoding, one document per row.
    """
    d = x_BxTxD.shape[-1]
    x_BxTxD = x_BxTxD.astype(self.dtype)

    def proj(heads, axes, name):
      kernel_DxNxH = self.param(f"{name}_kernel", _init(self.init_std, ("embed", axes, "kv")), (d, heads, self.head_dim))
      y = jnp.einsum("btd,dnh->btnh", x_BxTxD, kernel_DxNxH.astype(self.dtype))
      # No key bias: it adds q.b to every score of a query alike, which softmax
      # cancels, so its gradient is exactly zero and Adam would only amplify
      # rounding noise into it (and make parallel runs disagree on it).
      if self.use_bias and name != "key":
        y = y + self.param(f"{name}_bias", _zeros((axes, "kv")), (heads, self.head_dim)).astype(self.dtype)
      return y

    q_BxTxNxH = checkpoint_name(proj(self.num_heads, "heads", "query"), "query")
    k_BxTxKxH = checkpoint_name(proj(self.num_kv_heads, "kv_heads", "key"), "key")
    v_BxTxKxH = checkpoint_name(proj(self.num_kv_heads, "kv_heads", "value"), "value")
    if self.use_rope:
      q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, self.rope_theta)
      k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, self.rope_theta)
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("act_batch", "act_length", "act_heads", "act_kv"))
    if cache is None:
      out_BxTxNxH = attention.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, self.implementation
      )
    else:
      rows_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]
      cache = {
          name: nn.with_logical_constraint(
              cache[name].at[rows_Bx1, positions_BxT].set(new.astype(cache[name].dtype)),
              ("act_batch", "act_length", "act_heads", "act_kv"),
          )
          for name, new in (("k", k_BxTxKxH), ("v", v_BxTxKxH))
      }
      out_BxTxNxH = attention.cached_attention(q_BxTxNxH, cache["k"], cache["v"], positions_BxT)
    out_BxTxNxH = nn.with_logical_constraint(out_BxTxNxH, ("act_batch", "act_length", "act_heads", "act_kv"))
    out_BxTxNxH = checkpoint_name(out_BxTxNxH, "attn_out")
    kernel_NxHxD = self.param("out_kernel", _init(self.out_init_std, ("heads", "kv", "embed")), (self.num_heads, self.head_dim, d))
    out_BxTxD = jnp.einsum("btnh,nhd->btd", out_BxTxNxH, kernel_NxHxD.astype(self.dtype))
    if self.use_bias:
      out_BxTxD = out_BxTxD + self.param("out_bias", _zeros(("embed",)), (d,)).astype(self.dtype)
    return out_BxTxD, cache


class Mlp(nn.Module):
  mlp_dim: int
  kind: str  # "gelu" or "swiglu"
  use_bias: bool
  init_std: float
  out_init_std: float
  dtype: str

  @nn.compact
  def __call__(self, x_BxTxD):
    def dense(features, axes, std, name):
      return nn.Dense(
          features, use_bias=self.use_bias, dtype=self.dtype, kernel_init=_init(std, axes),
          bias_init=_zeros(axes[-1:]), name=name,
      )

    if self.kind == "swiglu":
      gate = dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "gate")(x_BxTxD)
      up = dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "up")(x_BxTxD)
      h_BxTxF = nn.silu(gate) * up
    else:
      h_BxTxF = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "up")(x_BxTxD))
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("act_batch", "act_length", "act_mlp"))
    return dense(x_BxTxD.shape[-1], ("mlp", "embed"), self.out_init_std, "down")(h_BxTxF)


class Block(nn.Module):
  """Pre-norm residual block. Returns (x, cache): `nn.scan` carries x (cache None)."""

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache=None):
    cfg = self.cfg
    # GPT-2's scaled init for the projections into the residual stream.
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    h = _norm(cfg, "attn_norm")(x_BxTxD)
    h, cache = Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.use_bias, cfg.position == "rope",
        cfg.rope_theta, cfg.init_std, out_std, cfg.dtype, cfg.attention, name="attn",
    )(h, segment_ids_BxT, positions_BxT, cache)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    h = _norm(cfg, "mlp_norm")(x_BxTxD)
    h = Mlp(cfg.mlp_dim, cfg.mlp, cfg.use_bias, cfg.init_std, out_std, cfg.dtype, name="mlp")(h)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    return x_BxTxD, cache


class Transformer(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V]; with a KV cache, (logits, new cache).

  The cache (see `init_cache`) holds one {"k", "v"} per layer; decoding runs
  with per-layer parameters (`unstack_layers`), not the scanned layout.
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT, positions_BxT, cache=None, head=True):
    """head=False: (final hidden states [B, T, D], unembedding [D, V]), both in the
    compute dtype, for a loss that makes the logits a chunk at a time (train.py)."""
    cfg = self.cfg
    if cache is not None and cfg.scan_layers:
      raise ValueError("decode with scan_layers=False and unstack_layers(params)")
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
        embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed",
    )
    x_BxTxD = embed(tokens_BxT)
    if cfg.position == "learned":
      pos_PxD = self.param("pos_embed", _init(cfg.init_std / 2, ("pos", "embed")), (cfg.max_len, cfg.d_model))
      x_BxTxD = x_BxTxD + jnp.take(pos_PxD, positions_BxT, axis=0).astype(cfg.dtype)
    x_BxTxD = nn.Dropout(cfg.dropout_rate)(x_BxTxD, deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      # One compiled block, applied num_layers times: compile time is flat in depth.
      x_BxTxD, _ = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.deterministic, name="layers")(x_BxTxD, segment_ids_BxT, positions_BxT)
    else:
      new_cache = []
      for i in range(cfg.num_layers):
        x_BxTxD, layer_cache = block(cfg, self.deterministic, name=f"layers_{i}")(
            x_BxTxD, segment_ids_BxT, positions_BxT, None if cache is None else cache[i]
        )
        new_cache.append(layer_cache)

    x_BxTxD = _norm(cfg, "final_norm")(x_BxTxD).astype(cfg.dtype)
    if cfg.tie_embeddings:
      w_DxV = embed.embedding.astype(cfg.dtype).T
    else:  # the same parameter (path, shape, init) nn.Dense(name="unembed") makes
      w_DxV = Unembed(cfg.vocab_size, cfg.init_std, name="unembed")(cfg.d_model).astype(cfg.dtype)
    if not head:
      return x_BxTxD, w_DxV
    logits_BxTxV = nn.with_logical_constraint(x_BxTxD @ w_DxV, ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return logits_BxTxV.astype(jnp.float32)
    return logits_BxTxV.astype(jnp.float32), new_cache


class Unembed(nn.Module):
  vocab_size: int
  init_std: float

  @nn.compact
  def __call__(self, d_model: int) -> jax.Array:
    return self.param("kernel", _init(self.init_std, ("embed", "vocab")), (d_model, self.vocab_size))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[dict]:
  """An empty KV cache for `batch` rows of up to `length` positions, in the compute dtype."""
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.num_layers)]


def num_params(params, *, exclude_positions: bool = False) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(
      x.size for path, x in leaves
      if not (exclude_positions and "pos_embed" in jax.tree_util.keystr(path))
  )


def stack_layers(params: dict, num_layers: int) -> dict:
  """Per-layer params (`layers_0`, ...) -> the scanned layout (`layers`, leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)]
  )
  return out


def unstack_layers(params: dict) -> dict:
  """The scanned layout -> per-layer params; inverse of `stack_layers`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
