"""A Transformer in Flax Linen: GPT-2, Llama and BERT families by config.

GPT-2: learned positions, LayerNorm, GELU MLP, biases. Llama: rotary positions,
RMSNorm, SwiGLU MLP, grouped-query attention, no biases. BERT (an encoder: the
objective's mask kind reads both ways): post-norm blocks after a normed embedding,
exact GELU, and an MLM head that transforms the hidden state before the tied output;
learned positions (BERT, RoBERTa) or rotary ones (RoFormer, configs/encoder.py). Parameters are float32 and carry logical axis names;
`ModelConfig.dtype` is the compute dtype.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpu_lm.model import layers
from tpu_lm.model.attention import Attention

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep the attention projections and output (tagged with checkpoint_name in
    # attention.py); recompute norms and the MLP: most of the memory saving of
    # "full" for a fraction of its recompute.
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
  norm_eps: float = 0.0  # 0: the family's (layers.DEFAULT_EPS)
  position: str = "learned"
  rope_theta: float = 10_000.0
  rope_scaling: tuple = ()  # (factor, low_freq_factor, high_freq_factor, original context): Llama 3's
  mlp: str = "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  init_std: float = 0.02
  attention: str = "xla"  # attention kernel, see kernels.py
  attention_mask: str = "causal"  # the objective's mask kind (kernels.MASK_KINDS); "prefix" reads a prefix input
  # The tokenizer's vocabulary; `vocab_size` is the embedding table, padded for even
  # sharding. Logits past vocab_used are masked: padding ids are never predicted and
  # take no probability (0: the whole table is used).
  vocab_used: int = 0
  # > 0: a sequence classifier. A head of this many classes reads pooled final hidden
  # states (method "classify"); there is no unembedding then.
  num_classes: int = 0
  # The speedrun's choices (modded-nanogpt; docs/training.md "Recipe"): RMSNorm of each
  # head's queries and keys before RoPE; logits capped smoothly at +-logit_softcap
  # (cap * tanh(logits / cap), 0: off); the projections into the residual stream
  # (attention out, MLP down) initialised to zero, so every block starts as the identity.
  qk_norm: bool = False
  logit_softcap: float = 0.0
  zero_init_out: bool = False
  # BERT's layout (Devlin et al. 2019; the Hugging Face interop's BertForMaskedLM and
  # RobertaForMaskedLM): "post" normalises each block's residual sum after its sublayer
  # (attn_norm after attention, mlp_norm after the MLP) and the embeddings before the
  # first block (embed_norm), with no final norm; "pre" (GPT-2, Llama) normalises each
  # sublayer's input and the last block's output. `head_transform`: the output head first
  # maps the hidden state through a dense layer, the MLP's activation and a LayerNorm,
  # and adds a bias to the vocabulary's logits (BERT's prediction head).
  norm_position: str = "pre"
  head_transform: bool = False
  # A vision-language model (model/vision.py's VisionConfig, or None): a ViT encodes each
  # image into patch embeddings that take the place of the first num_patches token
  # embeddings of its row, a prefix the "prefix" mask kind lets attend both ways.
  vision: object = None


# Finite, so that softmax, its gradient and any arithmetic on logits stay NaN-free.
MASKED_LOGIT = -1e30


class Block(nn.Module):
  """Residual block, pre-norm or post-norm (`norm_position`). Returns (x, cache):
  `nn.scan` carries x (cache None)."""

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache=None, prefix_BxT=None):
    cfg = self.cfg
    # GPT-2's scaled init for the projections into the residual stream (or zero).
    out_std = 0.0 if cfg.zero_init_out else cfg.init_std / (2 * cfg.num_layers) ** 0.5
    post = cfg.norm_position == "post"

    def norm(name):
      return layers.norm(cfg.norm, use_bias=cfg.use_bias, dtype=cfg.dtype, eps=cfg.norm_eps, name=name)

    h_BxTxD = x_BxTxD if post else norm("attn_norm")(x_BxTxD)
    h_BxTxD, cache = Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.use_bias, cfg.position == "rope",
        cfg.rope_theta, cfg.rope_scaling, cfg.init_std, out_std, cfg.dtype, cfg.attention, cfg.attention_mask,
        qk_norm_eps=(cfg.norm_eps or layers.DEFAULT_EPS["rmsnorm"]) if cfg.qk_norm else 0.0, name="attn",
    )(h_BxTxD, segment_ids_BxT, positions_BxT, cache, prefix_BxT)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(h_BxTxD, deterministic=self.deterministic)
    if post:
      x_BxTxD = norm("attn_norm")(x_BxTxD)
    h_BxTxD = x_BxTxD if post else norm("mlp_norm")(x_BxTxD)
    h_BxTxD = layers.Mlp(cfg.mlp_dim, cfg.mlp, cfg.use_bias, cfg.init_std, out_std, cfg.dtype, name="mlp")(h_BxTxD)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(h_BxTxD, deterministic=self.deterministic)
    if post:
      x_BxTxD = norm("mlp_norm")(x_BxTxD)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    return x_BxTxD, cache


class Transformer(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V]; with a KV cache, (logits, new cache).

  Two halves, callable on their own (`model.apply(..., method="hidden")`, then
  `method="logits"`) so a loss can make the logits a chunk at a time. The cache
  (see `init_cache`) holds one {"k", "v"} per layer; decoding runs with
  per-layer parameters (`params.unstack_layers`), not the scanned layout.
  """

  cfg: ModelConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed")),
    )
    if cfg.position == "learned":
      self.pos_embed = self.param(
          "pos_embed", layers.normal_init(cfg.init_std / 2, ("pos", "embed")), (cfg.max_len, cfg.d_model)
      )
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      # One compiled block, applied num_layers times: compile time is flat in depth.
      self.layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.deterministic)
    else:
      self.layers = [block(cfg, self.deterministic) for _ in range(cfg.num_layers)]  # layers_0, layers_1, ...
    self.embed_dropout = nn.Dropout(cfg.dropout_rate)

    def norm():
      return layers.norm(cfg.norm, use_bias=cfg.use_bias, dtype=cfg.dtype, eps=cfg.norm_eps, name=None)

    if cfg.norm_position == "post":
      self.embed_norm = norm()  # the blocks' outputs are normed already: no final norm
    else:
      self.final_norm = norm()
    if cfg.head_transform and not cfg.num_classes:
      # D -> D: its input sharded as every "embed" axis, its output left whole (as a norm's).
      self.head_dense = layers.projection(cfg.d_model, ("embed", "norm"), std=cfg.init_std, use_bias=True,
                                          dtype=cfg.dtype, name=None)
      self.head_norm = norm()
      self.output_bias = self.param("output_bias", layers.zeros_init(("vocab",)), (cfg.vocab_size,))
    if cfg.vision is not None:
      from tpu_lm.model import vision  # it builds its blocks from this module's

      self.vision_encoder = vision.VisionEncoder(cfg.vision)
    if cfg.num_classes:
      self.cls_head = layers.projection(
          cfg.num_classes, ("embed", "classes"), std=cfg.init_std, use_bias=True, dtype=cfg.dtype, name=None
      )
    elif not cfg.tie_embeddings:
      self.unembed = layers.projection(
          cfg.vocab_size, ("embed", "vocab"), std=cfg.init_std, use_bias=False, dtype=cfg.dtype, name=None
      )

  def __call__(self, tokens_BxT, segment_ids_BxT, positions_BxT, cache=None, prefix_BxT=None, images=None,
               image_rows_B=None):
    """Next-token logits [B, T, V] (with a cache: and the new cache); for a classifier,
    class logits [B, T, C] of every position's hidden state. `prefix_BxT`: with the
    prefix mask kind, the tokens of each document's prefix (they attend both ways).
    `images` [B, H, W, C] in [-1, 1] (a vision model's; at prefill, not at later decode
    steps): each row's image fills its first num_patches positions, whatever tokens are
    there, in the rows `image_rows_B` marks (all rows by default: a mixed batch marks its
    text-only rows False)."""
    x_BxTxD, cache = self.hidden(tokens_BxT, segment_ids_BxT, positions_BxT, cache, return_cache=True,
                                 prefix_BxT=prefix_BxT, images=images, image_rows_B=image_rows_B)
    if self.cfg.num_classes:
      return self.classify(x_BxTxD)
    logits_BxTxV = self.logits(x_BxTxD)
    return logits_BxTxV if cache is None else (logits_BxTxV, cache)

  def classify(self, pooled_xD):
    """Pooled hidden states [..., D] -> float32 class logits [..., C]."""
    return self.cls_head(pooled_xD).astype(jnp.float32)

  def hidden(self, tokens_BxT, segment_ids_BxT, positions_BxT, cache=None, return_cache=False, prefix_BxT=None,
             images=None, image_rows_B=None):
    """The final hidden states [B, T, D] (normed, compute dtype), before the unembedding."""
    cfg = self.cfg
    if self.is_initializing():  # parameters for every part, whatever the dummy input lacks
      if cfg.attention_mask == "prefix" and prefix_BxT is None:
        prefix_BxT = jnp.zeros(tokens_BxT.shape, bool)
      if cfg.vision is not None and images is None:  # the encoder's parameters, its output unused
        v = cfg.vision
        self.vision_encoder(jnp.zeros((1, v.image_height, v.image_width, v.channels), jnp.float32))
    if cfg.attention_mask == "prefix" and prefix_BxT is None and cache is None:
      raise ValueError("a prefix-LM model needs prefix_BxT: which tokens of each document are its prefix")
    if cache is not None and cfg.scan_layers:
      raise ValueError("decode with scan_layers=False and unstack_layers(params)")
    if images is not None and cfg.vision is None:
      raise ValueError("images for a model without a vision encoder (ModelConfig.vision)")
    x_BxTxD = self.embed(tokens_BxT)
    if images is not None:
      x_BxTxD = self._with_images(x_BxTxD, images, image_rows_B)
    if cfg.position == "learned":
      x_BxTxD = x_BxTxD + jnp.take(self.pos_embed, positions_BxT, axis=0).astype(cfg.dtype)
    if cfg.norm_position == "post":
      x_BxTxD = self.embed_norm(x_BxTxD)
    x_BxTxD = self.embed_dropout(x_BxTxD, deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    # The residual stream, seen from outside (tpu_lm.interpret): each `perturb` adds a
    # "perturbations" variable when one is passed (its gradient is the stream's; a
    # difference patches activations in) and is the identity otherwise; `sow` records
    # the stream when "intermediates" is mutable. Neither costs anything in training.
    x_BxTxD = self._probe("embeddings", x_BxTxD)
    new_cache = None
    if cfg.scan_layers:
      x_BxTxD, _ = self.layers(x_BxTxD, segment_ids_BxT, positions_BxT, None, prefix_BxT)
    else:
      new_cache = []
      for i, block in enumerate(self.layers):
        x_BxTxD, layer_cache = block(x_BxTxD, segment_ids_BxT, positions_BxT, None if cache is None else cache[i],
                                     prefix_BxT)
        new_cache.append(layer_cache)
        if cache is None:
          x_BxTxD = self._probe(f"residual_{i}", x_BxTxD)
    x_BxTxD = self._final_norm(x_BxTxD)
    if return_cache:
      return x_BxTxD, (new_cache if cache is not None else None)
    return x_BxTxD

  def _with_images(self, x_BxTxD, images, image_rows_B):
    """The first num_patches embeddings of each marked row replaced by its image's."""
    image_BxNxD = self.vision_encoder(images).astype(self.cfg.dtype)
    n = image_BxNxD.shape[1]
    if image_rows_B is not None:
      image_BxNxD = jnp.where(image_rows_B[:, None, None], image_BxNxD, x_BxTxD[:, :n])
    return jnp.concatenate([image_BxNxD, x_BxTxD[:, n:]], axis=1)

  def _probe(self, name, x_BxTxD):
    x_BxTxD = self.perturb(name, x_BxTxD)
    self.sow("intermediates", name, x_BxTxD)
    return x_BxTxD

  def _final_norm(self, x_BxTxD):
    if self.cfg.norm_position == "post":
      return x_BxTxD.astype(self.cfg.dtype)
    return self.final_norm(x_BxTxD).astype(self.cfg.dtype)

  def lens(self, x_BxTxD):
    """The logit lens: a residual stream [B, T, D] read out as the final layer's is
    (final norm, unembedding) -> float32 logits [B, T, V]."""
    return self.logits(self._final_norm(x_BxTxD))

  def logits(self, x_BxTxD):
    """Hidden states [B, T, D] -> float32 logits [B, T, V] (any T: a chunk will do)."""
    if self.cfg.head_transform:
      x_BxTxD = self.head_norm(layers.activation(self.cfg.mlp, self.head_dense(x_BxTxD)))
    if self.cfg.tie_embeddings and x_BxTxD.shape[0] * x_BxTxD.shape[1] <= 8:
      # A few rows (decoding): table x hidden^T reads each embedding row once,
      # contiguously, where hidden x table^T makes XLA CPU copy the table's transpose.
      w_VxD = self.embed.embedding.astype(self.cfg.dtype)
      x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).astype(self.cfg.dtype)
      logits_BxTxV = jax.lax.dot_general(w_VxD, x_NxD, (((1,), (1,)), ((), ()))).T.reshape(*x_BxTxD.shape[:2], -1)
    elif self.cfg.tie_embeddings:
      logits_BxTxV = self.embed.attend(x_BxTxD.astype(self.cfg.dtype))
    else:
      logits_BxTxV = self.unembed(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV, ("act_batch", "act_length", "act_vocab"))
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    if self.cfg.head_transform:
      logits_BxTxV = logits_BxTxV + self.output_bias
    if self.cfg.logit_softcap > 0:
      # Gemma 2's and the speedrun's soft cap: |logit| < cap, smooth, the identity near 0.
      cap = self.cfg.logit_softcap
      logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    if 0 < self.cfg.vocab_used < self.cfg.vocab_size:
      used_V = jnp.arange(self.cfg.vocab_size) < self.cfg.vocab_used
      logits_BxTxV = jnp.where(used_V, logits_BxTxV, MASKED_LOGIT)
    return logits_BxTxV


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[dict]:
  """An empty KV cache for `batch` rows of up to `length` positions, in the compute dtype."""
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # [B, K, S, H]: see attention.py
  return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.num_layers)]
