"""The building blocks every layer shares: initialisers with logical axis names, the
one projection layer, norms, rotary positions and the MLP.

Every matmul with a weight in the model is `projection(...)`, a Flax
`nn.Dense`: quantization and LoRA (Qwix) intercept exactly that layer, so
they apply to the whole model without editing it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def normal_init(std: float, axes: tuple):
  """N(0, std^2); std 0 is zeros (the speedrun's zero-initialised output projections)."""
  init = nn.initializers.normal(std) if std > 0 else nn.initializers.zeros_init()
  return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def projection(features: int, axes: tuple, *, std: float, use_bias: bool, dtype: str, name: str | None) -> nn.Dense:
  """A weight matmul of the last input dimension into `features`.

  `axes` names the kernel's (input, output) dimensions for sharding; the bias, if
  any, takes the output name. Parameters stay float32; `dtype` is the compute
  dtype. Kernels are 2-D, as Hugging Face and PyTorch store them (transposed):
  attention heads are a reshape of the output, not a kernel dimension.
  """
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, kernel_init=normal_init(std, axes),
      bias_init=zeros_init(axes[1:]), name=name,
  )


# The epsilons of the two families' reference models (GPT-2, Llama), used where
# a config leaves model.norm_eps at 0.
DEFAULT_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


def norm(kind: str, *, use_bias: bool, dtype: str, name: str, eps: float = 0.0) -> nn.Module:
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
  eps = eps or DEFAULT_EPS[kind]
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale, name=name)
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, use_bias=use_bias, scale_init=scale, bias_init=zeros_init(("norm",)), name=name,
  )


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()) -> jax.Array:
  """The H/2 rotary frequencies; `scaling` = (factor, low_freq_factor, high_freq_factor,
  original context) applies Llama 3's long-context rescaling: wavelengths longer than
  original/low are slowed by `factor`, shorter than original/high kept, and those in
  between interpolated."""
  freqs_F = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if not scaling:
    return freqs_F
  factor, low, high, original = scaling
  wavelen_F = 2 * jnp.pi / freqs_F
  smooth_F = (original / wavelen_F - low) / (high - low)
  scaled_F = jnp.where(wavelen_F > original / low, freqs_F / factor, freqs_F)
  medium_F = (wavelen_F >= original / high) & (wavelen_F <= original / low)
  return jnp.where(medium_F, (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F, scaled_F)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float, scaling: tuple = ()) -> jax.Array:
  """Rotary position embedding (rotate-half form, as Hugging Face's Llama), in float32."""
  freqs_F = rope_frequencies(x_BxTxNxH.shape[-1], theta, scaling)
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * freqs_F
  sin, cos = jnp.sin(angles_BxTxF)[:, :, None], jnp.cos(angles_BxTxF)[:, :, None]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def activation(kind: str, x):
  """The MLP's nonlinearity of a one-matrix `kind` (BERT's head transform uses it too):
  "gelu" is GPT-2's tanh approximation, "gelu_exact" the erf form (BERT, RoBERTa)."""
  if kind == "relu2":
    return jnp.square(nn.relu(x))
  if kind == "swiglu":  # a head transform of a SwiGLU model: its gate's activation
    return nn.silu(x)
  return nn.gelu(x, approximate=kind != "gelu_exact")


class Mlp(nn.Module):
  mlp_dim: int
  # "gelu" (tanh form), "gelu_exact" (erf form), "swiglu", or "relu2" (ReLU squared: the
  # speedrun's, So et al. 2021's Primer)
  kind: str
  use_bias: bool
  init_std: float
  out_init_std: float
  dtype: str

  @nn.compact
  def __call__(self, x_BxTxD):
    def dense(features, axes, std, name):
      return projection(features, axes, std=std, use_bias=self.use_bias, dtype=self.dtype, name=name)

    if self.kind == "swiglu":
      gate_BxTxF = dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "gate")(x_BxTxD)
      up_BxTxF = dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "up")(x_BxTxD)
      h_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
    else:
      h_BxTxF = activation(self.kind, dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "up")(x_BxTxD))
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("act_batch", "act_length", "act_mlp"))
    return dense(x_BxTxD.shape[-1], ("mlp", "embed"), self.out_init_std, "down")(h_BxTxF)
