"""Sequence classification: one example per row (its class in the record's
data.label_key feature), cross-entropy of a head on the pooled final hidden state;
a decoder's causal attention, or an encoder's both ways (task.attention).
Eval: accuracy, per-class and macro precision, recall and F1, the confusion matrix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import RowLayout
from tpu_lm.tasks import losses

NAME = "classification"
METRICS = {"eval_loss": "minimize", "eval_accuracy": "maximize", "eval_macro_f1": "maximize",
           "eval_macro_precision": "maximize", "eval_macro_recall": "maximize"}
_UNLABELED = ("python_stdlib", "text_files", "instructions")  # the datasets here without a label feature


@dataclasses.dataclass(frozen=True)
class Classifier:
  num_classes: int
  pooling: str = "last"  # the last real token's state (its EOS), the first's (BOS: an encoder's CLS), or the mean
  class_names: tuple = ()
  text_key: str = "text"
  label_key: str = "label"
  attention: str = "causal"  # "bidirectional" to classify with an encoder (task.attention)

  name = NAME
  generates = False
  chat = False
  layout = RowLayout(one_per_row=True)
  records = "classification"
  text_reference = False
  labels = True
  metrics = METRICS
  sentinels = ()  # no special tokens of its own
  infills = False

  def features(self) -> list[tuple[str, str]]:
    return [("data.text_key", self.text_key), ("data.label_key", self.label_key)]

  def sample_text(self, record) -> str:
    return as_text(record[self.text_key])

  def encode(self, records, tokenizer) -> list[Encoded]:
    texts = [as_text(r[self.text_key]) for r in records]
    return [Encoded(np.asarray(ids, np.int32), num_bytes=len(t.encode("utf-8")), label=int(r[self.label_key]))
            for ids, t, r in zip(tokenizer.encode_batch(texts), texts, records)]

  def chat_prompt(self, messages) -> str | None:
    return None

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    if config.data.dataset in _UNLABELED:
      fail("data.dataset", config.data.dataset, "task.kind='classification' needs a dataset with labels, e.g."
           " 'stdlib_functions', 'glue/sst2' or 'imdb_reviews'")

  def _logits(self, model, params, batch, rngs):
    hidden_BxTxD = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], rngs=rngs,
                               method="hidden", **losses.extra_inputs(batch))
    real_BxT = (batch["segment_ids"] > 0).astype(jnp.float32)
    pooled_BxD = pool(hidden_BxTxD, real_BxT, self.pooling)
    weight_B = real_BxT[:, 0]  # padding rows (all segment 0) count for nothing
    return model.apply({"params": params}, pooled_BxD, method="classify"), weight_B

  def loss(self, model, params, batch, rng):
    import optax  # here: inference reads objectives and never imports an optimizer library

    logits_BxC, weight_B = self._logits(model, params, batch, None if rng is None else {"dropout": rng})
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
    correct_B = (jnp.argmax(logits_BxC, -1) == batch["label"]).astype(jnp.float32)
    count = weight_B.sum()
    return (nll_B * weight_B).sum(), count, {"accuracy": (correct_B * weight_B).sum() / jnp.maximum(count, 1)}

  def eval_sums(self, model, params, batch) -> dict:
    import optax

    logits_BxC, weight_B = self._logits(model, params, batch, None)
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
    true_BxC = jax.nn.one_hot(batch["label"], self.num_classes) * weight_B[:, None]
    pred_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), self.num_classes)
    return {"nats": (nll_B * weight_B).sum(), "examples": weight_B.sum(), "confusion": true_BxC.T @ pred_BxC}

  def eval_metrics(self, sums: dict) -> dict:
    return classification_metrics(np.asarray(sums["confusion"]), float(sums["nats"]), self.class_names)


def pool(hidden_BxTxD, real_BxT, pooling: str):
  """One state per row from its real (non-padding, left-aligned) positions: "mean", the
  "first" (BOS: an encoder's CLS) or the "last" (its EOS, for a decoder the one that
  has read the whole row). Classifiers and the server's embeddings pool alike."""
  if pooling == "mean":
    return (hidden_BxTxD * real_BxT[..., None]).sum(1) / jnp.maximum(real_BxT.sum(1), 1)[:, None]
  if pooling == "first":
    return hidden_BxTxD[:, 0]
  last_B = jnp.maximum(real_BxT.sum(1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]


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


def build(config, class_names=()) -> Classifier:
  return Classifier(len(class_names), config.task.pooling, tuple(class_names), config.data.text_key,
                    config.data.label_key, config.task.attention or "causal")
