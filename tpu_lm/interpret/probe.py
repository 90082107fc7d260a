"""Looking inside a language model: attention maps, the logit lens, attributions and
activation patching, as pure functions of (model, params, tokens).

The model's residual stream is exposed by `Transformer._probe` points (after the
embeddings, after each block): Flax `sow` records it when "intermediates" is
mutable, and a "perturbations" variable added there patches it (or takes its
gradient). Attention probabilities come from the reference attention path, which the
model takes only when "intermediates" is mutable (the fused kernels never form them).
Everything here runs one prompt (a batch of one row, one document) at a time.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError

EMBED = "embeddings"


def probe_names(num_layers: int) -> list[str]:
  """The residual stream's probe points, input to output: embeddings, residual_0, ..."""
  return [EMBED] + [f"residual_{i}" for i in range(num_layers)]


def _inputs(tokens_T):
  tokens_1xT = jnp.asarray(tokens_T, jnp.int32)[None]
  return tokens_1xT, jnp.ones_like(tokens_1xT), jnp.arange(tokens_1xT.shape[1])[None]


@dataclasses.dataclass(frozen=True)
class Trace:
  logits_TxV: np.ndarray  # float32 next-token logits
  attention_LxNxTxT: np.ndarray  # per layer and head: query rows, key columns; rows sum to 1
  residual_PxTxD: np.ndarray  # the stream at each probe point (probe_names)


@functools.lru_cache(maxsize=16)
def compiled_apply(model, record: bool = False, method: str | None = None):
  """`model.apply(variables, *inputs)` jitted once per (model, kind): the calls of one
  look (clean and corrupted text, text and baseline, every canary) compile once.
  `record`: the "intermediates" collection mutable, so the reference attention path
  runs and the probes are recorded; returns (output, state) then."""
  return jax.jit(lambda variables, *inputs: model.apply(
      variables, *inputs, mutable=["intermediates"] if record else False, method=method))


def trace(model, params, tokens_T) -> Trace:
  """One forward pass of the reference path, recording attention and the stream."""
  logits_1xTxV, state = compiled_apply(model, record=True)({"params": params}, *_inputs(tokens_T))
  inter = state["intermediates"]
  n = model.cfg.num_layers
  attention = np.stack([np.asarray(inter[f"layers_{i}"]["attn"]["attn_probs"][0][0]) for i in range(n)])
  residual = np.stack([np.asarray(inter[name][0][0]) for name in probe_names(n)])
  return Trace(np.asarray(logits_1xTxV[0]), attention, residual)


def logit_lens(model, params, residual_PxTxD, k: int = 5):
  """The top-k next-token predictions read off every probe point of the stream (the
  final norm and unembedding applied to it): (ids [P, T, k], probabilities [P, T, k]).
  The last point's lens is the model's own output."""
  logits_PxTxV = compiled_apply(model, method="lens")({"params": params}, jnp.asarray(residual_PxTxD))
  probs_PxTxV = jax.nn.softmax(logits_PxTxV, axis=-1)
  top_p, top_i = jax.lax.top_k(probs_PxTxV, k)
  return np.asarray(top_i), np.asarray(top_p)


def _zero_perturbations(model, params, tokens_T):
  """The "perturbations" tree of a one-row input: zeros shaped like each probe point."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(tokens_T))["perturbations"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _target_logprob(model, params, perturbations, tokens_T, position: int, target: int):
  logits_1xTxV = model.apply({"params": params, "perturbations": perturbations}, *_inputs(tokens_T))
  return jax.nn.log_softmax(logits_1xTxV[0, position])[target]


def check_position(tokens_T, position: int) -> int:
  t = len(tokens_T)
  if not -t <= position < t:
    raise UserError(f"position {position} is outside the {t} tokens of the text: give one in {-t} .. {t - 1}.")
  return position % t


def attributions(model, params, tokens_T, position: int, target: int, steps: int = 32, baseline_id: int = 0) -> dict:
  """How much each input token contributes to log p(target | tokens[:position + 1]):

  - gradient x input: the gradient of that log-probability with respect to each
    token's input embedding, dotted with the embedding;
  - integrated gradients (Sundararajan et al. 2017): (x - x') times the mean
    gradient along the straight path from the baseline x' to x, by the trapezoid
    rule over `steps` intervals. The baseline is the same text with every token but
    the first replaced by `baseline_id` (the tokenizer's padding: "no content"),
    not all-zero embeddings: the blocks' input norms are scale-invariant, so on the
    path from zero f jumps at the origin and the integral is ill-posed. Completeness:
    the attributions add up to f(x) - f(x'), and `completeness_gap` is the difference.
  Tokens after `position` cannot contribute (causality): theirs are exactly zero.
  """
  position = check_position(tokens_T, position)
  zeros = _zero_perturbations(model, params, tokens_T)
  x_1xTxD = jnp.asarray(trace_embeddings(model, params, tokens_T))[None]
  baseline_T = [tokens_T[0]] + [baseline_id] * (len(tokens_T) - 1)
  base_1xTxD = jnp.asarray(trace_embeddings(model, params, baseline_T))[None]

  def f(alpha, delta_TxD):
    # This perturbation feeds the blocks x' + alpha (x - x') + delta: the gradient in
    # delta (at 0) is the gradient of f at that point of the path.
    pert = {**zeros, EMBED: (base_1xTxD - x_1xTxD) * (1.0 - alpha) + delta_TxD[None]}
    return _target_logprob(model, params, pert, tokens_T, position, target)

  along_path = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=1), in_axes=(0, None)))
  values_A, grads_AxTxD = along_path(jnp.linspace(0.0, 1.0, steps + 1), jnp.zeros_like(x_1xTxD[0]))
  grad_x_input_T = (grads_AxTxD[-1] * x_1xTxD[0]).sum(-1)
  mean_grad_TxD = (grads_AxTxD[:-1] + grads_AxTxD[1:]).sum(0) / (2 * steps)
  ig_T = (mean_grad_TxD * (x_1xTxD[0] - base_1xTxD[0])).sum(-1)
  f_x, f_base = float(values_A[-1]), float(values_A[0])
  return {"grad_x_input": np.asarray(grad_x_input_T), "integrated_gradients": np.asarray(ig_T),
          "logprob": f_x, "baseline_logprob": f_base,
          "completeness_gap": float(ig_T.sum()) - (f_x - f_base)}


def trace_embeddings(model, params, tokens_T) -> np.ndarray:
  """The input embeddings [T, D] the blocks receive (token + learned position)."""
  return trace(model, params, tokens_T).residual_PxTxD[0]


def activation_patching(model, params, clean_T, corrupt_T, position: int = -1, target: int | None = None) -> dict:
  """Patch the clean run's residual stream into the corrupted run, one (probe point,
  position) at a time, and see how much of the clean prediction comes back.

  The metric is log p(target) at `position` (target: the clean run's top prediction
  there); `restored[p, t]` = (patched - corrupted) / (clean - corrupted): 1 where
  patching that one activation restores the clean answer fully, 0 where it does
  nothing. All (P x T) patched runs go through one batched forward pass.
  """
  if len(clean_T) != len(corrupt_T):
    raise UserError(f"the clean text has {len(clean_T)} tokens and the corrupted one {len(corrupt_T)}: patching"
                    " pairs positions, so the two must tokenize to the same length (change a word for a word).")
  position = check_position(clean_T, position)
  clean, corrupt = trace(model, params, clean_T), trace(model, params, corrupt_T)
  if target is None:
    target = int(np.argmax(clean.logits_TxV[position]))
  names = probe_names(model.cfg.num_layers)
  p_count, t_count = len(names), len(clean_T)
  diff_PxTxD = clean.residual_PxTxD - corrupt.residual_PxTxD
  # Row (p, t) of the batch adds the clean-minus-corrupted difference at point p,
  # position t only: exactly the clean activation there.
  onehot_PxTxPxT = np.eye(p_count * t_count, dtype=np.float32).reshape(p_count, t_count, p_count, t_count)
  patches = {name: jnp.asarray(np.einsum("abt,td->abtd", onehot_PxTxPxT[:, :, i], diff_PxTxD[i]))
             .reshape(p_count * t_count, t_count, -1) for i, name in enumerate(names)}
  tokens_NxT = jnp.tile(jnp.asarray(corrupt_T, jnp.int32)[None], (p_count * t_count, 1))
  segments, positions = jnp.ones_like(tokens_NxT), jnp.tile(jnp.arange(t_count)[None], (p_count * t_count, 1))
  logits_NxTxV = compiled_apply(model)({"params": params, "perturbations": patches}, tokens_NxT, segments, positions)
  patched_N = np.asarray(jax.nn.log_softmax(logits_NxTxV[:, position])[:, target])
  clean_lp = float(jax.nn.log_softmax(clean.logits_TxV[position])[target])
  corrupt_lp = float(jax.nn.log_softmax(corrupt.logits_TxV[position])[target])
  denom = clean_lp - corrupt_lp
  restored = (patched_N.reshape(p_count, t_count) - corrupt_lp) / (denom if abs(denom) > 1e-9 else np.nan)
  return {"restored_PxT": restored, "patched_logprob_PxT": patched_N.reshape(p_count, t_count),
          "clean_logprob": clean_lp, "corrupt_logprob": corrupt_lp, "target": target, "position": position,
          "points": names}
