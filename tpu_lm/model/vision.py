"""A ViT image encoder (Dosovitskiy et al. 2021) and the projector that turns its patch
states into a decoder's input embeddings: the image half of a vision-language model in
the PaLI / LLaVA design, where an image becomes a prefix of the text.

An image [H, W, C] is cut into non-overlapping patches (P x P, or `patch_height` x P:
a line of text reads best in full-height strips, one position per few pixels of the
line) in reading order (row by row), each flattened and projected to the encoder's width, plus a learned position per
patch; pre-norm Transformer blocks (the decoder's own `Block`, attending both ways) and
a final norm follow, then the projector ("linear", or LLaVA-1.5's "mlp": two layers with
a GELU) maps each patch state to `out_dim`, the decoder's width. Every matmul is the one
`projection` layer, so quantization and LoRA reach the encoder as they reach the decoder.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from tpu_lm.model import layers
from tpu_lm.model.transformer import Block, ModelConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_height: int
  image_width: int
  out_dim: int  # the decoder's width
  channels: int = 1
  patch: int = 8  # pixels; the patches' width, and their height unless patch_height is set
  patch_height: int = 0
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  projector: str = "linear"  # or "mlp"
  init_std: float = 0.02
  dtype: str = "float32"

  @property
  def patch_shape(self) -> tuple[int, int]:
    return self.patch_height or self.patch, self.patch

  @property
  def grid(self) -> tuple[int, int]:
    ph, pw = self.patch_shape
    return self.image_height // ph, self.image_width // pw

  @property
  def num_patches(self) -> int:
    rows, cols = self.grid
    return rows * cols

  def check(self) -> None:
    ph, pw = self.patch_shape
    if self.image_height % ph or self.image_width % pw:
      raise ValueError(f"a {self.image_height}x{self.image_width} image does not cut into {ph}x{pw}-pixel patches")
    if self.d_model % self.num_heads:
      raise ValueError(f"width {self.d_model} does not split into {self.num_heads} heads")
    if self.projector not in ("linear", "mlp"):
      raise ValueError(f"projector {self.projector!r}: use 'linear' or 'mlp'")

  def block_config(self) -> ModelConfig:
    """The blocks' settings: pre-norm LayerNorm, GELU, biases, attention both ways, no
    rotary positions (the patches carry learned ones)."""
    return ModelConfig(vocab_size=1, num_layers=self.num_layers, d_model=self.d_model, num_heads=self.num_heads,
                       num_kv_heads=self.num_heads, head_dim=self.d_model // self.num_heads, mlp_dim=self.mlp_dim,
                       max_len=self.num_patches, norm="layernorm", position="learned", mlp="gelu", use_bias=True,
                       init_std=self.init_std, dtype=self.dtype, attention="xla", attention_mask="bidirectional")


def patchify(images_BxHxWxC, patch: int, patch_height: int = 0):
  """[B, H, W, C] -> [B, N, Ph*Pw*C]: patches (patch_height or patch tall, patch wide) in
  reading order, each row-major within."""
  b, h, w, c = images_BxHxWxC.shape
  ph, pw = patch_height or patch, patch
  x = images_BxHxWxC.reshape(b, h // ph, ph, w // pw, pw, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def pixels_to_unit(images_uint8):
  """uint8 pixels -> float32 in [-1, 1]."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


class VisionEncoder(nn.Module):
  """images [B, H, W, C] (float, in [-1, 1]) -> patch embeddings [B, N, out_dim]."""

  cfg: VisionConfig

  @nn.compact
  def __call__(self, images_BxHxWxC):
    cfg = self.cfg
    block_cfg = cfg.block_config()
    patches_BxNxF = patchify(images_BxHxWxC, cfg.patch, cfg.patch_height).astype(cfg.dtype)
    # "vision": a feature axis of the image side kept whole (the flattened patch; the
    # encoder's width where it meets the projector, whose output takes "embed").
    x_BxNxD = layers.projection(cfg.d_model, ("vision", "embed"), std=cfg.init_std, use_bias=True, dtype=cfg.dtype,
                                name="patch_embed")(patches_BxNxF)
    pos_NxD = self.param("pos_embed", layers.normal_init(cfg.init_std, ("pos", "embed")),
                         (cfg.num_patches, cfg.d_model))
    x_BxNxD = x_BxNxD + pos_NxD.astype(cfg.dtype)
    b, n = x_BxNxD.shape[:2]
    segments_BxN = jnp.ones((b, n), jnp.int32)
    positions_BxN = jnp.broadcast_to(jnp.arange(n), (b, n))
    for i in range(cfg.num_layers):
      x_BxNxD, _ = Block(block_cfg, deterministic=True, name=f"layers_{i}")(x_BxNxD, segments_BxN, positions_BxN)
    x_BxNxD = layers.norm("layernorm", use_bias=True, dtype=cfg.dtype, name="final_norm")(x_BxNxD)
    if cfg.projector == "mlp":
      x_BxNxD = nn.gelu(layers.projection(cfg.out_dim, ("vision", "mlp"), std=cfg.init_std, use_bias=True,
                                          dtype=cfg.dtype, name="projector_in")(x_BxNxD), approximate=False)
      return layers.projection(cfg.out_dim, ("mlp", "embed"), std=cfg.init_std, use_bias=True, dtype=cfg.dtype,
                               name="projector_out")(x_BxNxD)
    return layers.projection(cfg.out_dim, ("vision", "embed"), std=cfg.init_std, use_bias=True, dtype=cfg.dtype,
                             name="projector")(x_BxNxD)
