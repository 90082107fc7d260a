"""Token-level cross-entropy, whole or a chunk of positions at a time: the loss
any task over next-token predictions builds on."""

import jax
import jax.numpy as jnp


def token_weights(batch) -> jax.Array:
  """1 for every target that counts, 0 elsewhere: `loss_mask` when the batch has one
  (e.g. completion tokens only), else every real (non-padding) position."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(jnp.float32)
  return (batch["segment_ids"] > 0).astype(jnp.float32)


def extra_inputs(batch) -> dict:
  """The model's keyword inputs beyond tokens a batch may carry: the prefix a prefix LM
  reads both ways, and images (uint8 pixels -> [-1, 1]) with the rows that have one."""
  out = {"prefix_BxT": batch.get("prefix")}
  if "image" in batch:
    from tpu_lm.model.vision import pixels_to_unit

    out["images"] = pixels_to_unit(batch["image"])
    out["image_rows_B"] = batch.get("image_row")
  return out


def cross_entropy_sum(logits_BxTxV, targets_BxT, weights_BxT, z_loss: float = 0.0):
  """Summed, weighted cross-entropy (nats) and the summed weights. z_loss > 0 adds
  PaLM's auxiliary z_loss * log(Z)^2 per target (Z the softmax normaliser): it keeps
  the logits from drifting, and is zero for normalised logits."""
  import optax  # here, not at the top: inference reads objectives and never imports an optimizer library

  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  total = (nll_BxT * weights_BxT).sum()
  if z_loss:
    total = total + z_loss * log_z_squared_sum(logits_BxTxV, weights_BxT)
  return total, weights_BxT.sum()


def log_z_squared_sum(logits_BxTxV, weights_BxT):
  """The weighted sum of log(Z)^2 over positions (Z the softmax normaliser): the z-loss
  before its coefficient."""
  return (jnp.square(jax.nn.logsumexp(logits_BxTxV.astype(jnp.float32), axis=-1)) * weights_BxT).sum()


def token_nats(model, params, batch, rngs=None, logits_chunk: int = 0, z_loss: float = 0.0):
  """Summed cross-entropy of the batch's weighted targets, and their count (with
  z_loss > 0, plus the z-loss term: for training, never for eval).

  logits_chunk > 0: the [B, T, V] logits are never whole. The sequence is cut into
  chunks of that many positions; a scan makes each chunk's logits, reduces them to
  a loss, and (jax.checkpoint) makes them again in the backward pass instead of
  keeping them: logits memory B x chunk x V instead of B x T x V, for one more
  unembedding matmul. Same loss and gradients as the whole (to float rounding).
  """
  variables = {"params": params}
  weights_BxT = token_weights(batch)
  hidden_BxTxD = model.apply(variables, batch["inputs"], batch["segment_ids"], batch["positions"], rngs=rngs,
                             method="hidden", **extra_inputs(batch))
  t = hidden_BxTxD.shape[1]
  if not logits_chunk or logits_chunk >= t:
    return cross_entropy_sum(model.apply(variables, hidden_BxTxD, method="logits"), batch["targets"], weights_BxT,
                             z_loss)
  b, n = hidden_BxTxD.shape[0], t // logits_chunk

  def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]; each device keeps its rows
    return x.reshape(b, n, logits_chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_nats(params, xs):
    h_BxCxD, targets_BxC, weights_BxC = xs
    return cross_entropy_sum(model.apply({"params": params}, h_BxCxD, method="logits"), targets_BxC, weights_BxC,
                             z_loss)

  def body(carry, xs):
    nats, count = chunk_nats(params, xs)
    return (carry[0] + nats, carry[1] + count), None

  xs = (chunks(hidden_BxTxD), chunks(batch["targets"]), chunks(weights_BxT))
  (nats, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), xs)
  return nats, count


def scored_token_sums(model, params, batch) -> dict:
  """An eval batch's summed cross-entropy ("nats"), scored targets ("tokens"), targets the
  argmax gets right ("correct") and the documents it ends ("documents"): the sums behind
  loss and next-token accuracy, for objectives whose rows carry their targets and weights."""
  variables = {"params": params}
  hidden_BxTxD = model.apply(variables, batch["inputs"], batch["segment_ids"], batch["positions"], method="hidden",
                             **extra_inputs(batch))
  logits_BxTxV = model.apply(variables, hidden_BxTxD, method="logits")
  weights_BxT = token_weights(batch)
  nats, count = cross_entropy_sum(logits_BxTxV, batch["targets"], weights_BxT)
  correct = ((jnp.argmax(logits_BxTxV, -1) == batch["targets"]) * weights_BxT).sum()
  return {"nats": nats, "tokens": count, "correct": correct, "documents": batch["num_docs"].sum()}
