"""What a run optimizes and how it is evaluated: a task.

The train step (step.py) is generic over the task. A task gives

- `loss(model, params, batch, rng) -> (sum, count, metrics)`: the summed loss over
  the batch and what it is summed over (tokens, examples); the step divides, and
  gradient accumulation, loss scaling and the non-finite guard never look inside;
- `eval_sums(model, params, batch) -> {name: sum}`, added up over the eval split;
- `eval_metrics(sums) -> {name: value}`, the logged eval record.

The language model is the first task; classification, distillation and
instruction tuning (a `loss_mask` in the batch) plug in the same way.
"""

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpu_lm.training import losses


class Task(Protocol):
  generates: bool  # whether samples of generated text mean anything after training

  def loss(self, model, params, batch, rng): ...

  def eval_sums(self, model, params, batch) -> dict: ...

  def eval_metrics(self, sums: dict) -> dict: ...


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """Next-token cross-entropy; eval in nats/token, perplexity and bits per byte."""

  logits_chunk: int = 0  # see losses.token_nats
  generates = True

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    nats, count = losses.token_nats(model, params, batch, rngs, self.logits_chunk)
    return nats, count, {}

  def eval_sums(self, model, params, batch) -> dict:
    nats, count = losses.token_nats(model, params, batch, None, self.logits_chunk)
    # Eval rows carry the UTF-8 bytes of the documents they end, and how many (data/stream.py).
    return {"nats": nats, "tokens": count, "bytes": batch["num_bytes"].astype(jnp.float32).sum(),
            "documents": batch["num_docs"].sum()}

  def eval_metrics(self, sums: dict) -> dict:
    nats, count, num_bytes = float(sums["nats"]), float(sums["tokens"]), float(sums["bytes"])
    loss = nats / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50)),
        # Per UTF-8 byte of the evaluated text: comparable across tokenizers.
        "eval_bpb": nats / math.log(2) / max(num_bytes, 1),
        # What was scored (ints: a count, not a metric).
        "eval_tokens": int(count), "eval_documents": int(sums["documents"]),
    }


@dataclasses.dataclass(frozen=True)
class Classifier:
  """One example per row (batch["label"] its class): cross-entropy of a head on the
  pooled final hidden state. Eval: accuracy, per-class and macro precision, recall and
  F1, and the confusion matrix (rows: true class, columns: predicted)."""

  num_classes: int
  pooling: str = "last"  # the last real token's state (its EOS), or the mean over real tokens
  class_names: tuple = ()
  generates = False

  def _logits(self, model, params, batch, rngs):
    hidden_BxTxD = model.apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], rngs=rngs, method="hidden")
    real_BxT = (batch["segment_ids"] > 0).astype(jnp.float32)
    if self.pooling == "mean":
      pooled_BxD = (hidden_BxTxD * real_BxT[..., None]).sum(1) / jnp.maximum(real_BxT.sum(1), 1)[:, None]
    else:
      last_B = jnp.maximum(real_BxT.sum(1).astype(jnp.int32) - 1, 0)
      pooled_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    weight_B = real_BxT[:, 0]  # padding rows (all segment 0) count for nothing
    return model.apply({"params": params}, pooled_BxD, method="classify"), weight_B

  def loss(self, model, params, batch, rng):
    logits_BxC, weight_B = self._logits(model, params, batch, None if rng is None else {"dropout": rng})
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
    correct_B = (jnp.argmax(logits_BxC, -1) == batch["label"]).astype(jnp.float32)
    count = weight_B.sum()
    return (nll_B * weight_B).sum(), count, {"accuracy": (correct_B * weight_B).sum() / jnp.maximum(count, 1)}

  def eval_sums(self, model, params, batch) -> dict:
    logits_BxC, weight_B = self._logits(model, params, batch, None)
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
    true_BxC = jax.nn.one_hot(batch["label"], self.num_classes) * weight_B[:, None]
    pred_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), self.num_classes)
    return {"nats": (nll_B * weight_B).sum(), "examples": weight_B.sum(), "confusion": true_BxC.T @ pred_BxC}

  def eval_metrics(self, sums: dict) -> dict:
    return classification_metrics(np.asarray(sums["confusion"]), float(sums["nats"]), self.class_names)


def classification_metrics(confusion_CxC: np.ndarray, nats: float = 0.0, class_names=()) -> dict:
  """Accuracy, per-class and macro precision/recall/F1 from a confusion matrix (rows
  true, columns predicted). A class never predicted (or never present) has precision
  (recall) 0, as scikit-learn's zero_division=0."""
  c = np.asarray(confusion_CxC, np.float64)
  tp, predicted, actual = np.diag(c), c.sum(0), c.sum(1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
  total = c.sum()
  names = list(class_names) or [str(i) for i in range(len(c))]
  return {
      "eval_loss": nats / max(total, 1), "eval_accuracy": float(tp.sum() / max(total, 1)),
      "eval_macro_precision": float(precision.mean()), "eval_macro_recall": float(recall.mean()),
      "eval_macro_f1": float(f1.mean()),
      "eval_per_class": {n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                         for n, p, r, f, s in zip(names, precision, recall, f1, actual)},
      "eval_confusion": c.astype(np.int64).tolist(),
      "eval_examples": int(total),
  }


@dataclasses.dataclass(frozen=True)
class Distill(LanguageModel):
  """Knowledge distillation into the model from a frozen teacher on the same tokens:
  per target token, alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy,
  the distributions at temperature T (Hinton et al., 2015; T^2 keeps the soft
  targets' gradients on the scale of the hard ones'). Eval is the language model's.

  The teacher's parameters are an argument of the compiled step, bound per trace
  (`bind`), never a constant compiled into it.
  """

  alpha: float = 0.5
  temperature: float = 2.0
  teacher: object = None  # the teacher's model (Linen module)
  teacher_params: object = None

  def bind(self, frozen) -> "Distill":
    return dataclasses.replace(self, teacher_params=frozen)

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    inputs = (batch["inputs"], batch["segment_ids"], batch["positions"])
    weights_BxT = losses.token_weights(batch)
    student_BxTxV = model.apply({"params": params}, *inputs, rngs=rngs)
    teacher_BxTxV = self.teacher.apply({"params": jax.lax.stop_gradient(self.teacher_params)}, *inputs)
    ce, count = losses.cross_entropy_sum(student_BxTxV, batch["targets"], weights_BxT)
    t = self.temperature
    log_student = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / t, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / t, axis=-1)
    kl_BxT = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    kl = (kl_BxT * weights_BxT).sum()
    return self.alpha * t**2 * kl + (1 - self.alpha) * ce, count, {"kl": kl, "ce": ce}


def from_config(config, num_classes: int = 0, class_names=()) -> Task:
  if config.task.kind == "classification":
    return Classifier(num_classes, config.task.pooling, tuple(class_names))
  return LanguageModel(logits_chunk=config.model.logits_chunk)
