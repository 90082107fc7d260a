"""The causal language model: next-token cross-entropy over packed documents.
Eval in nats/token, perplexity and bits per UTF-8 byte."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import PACKED
from tpu_lm.tasks import losses

NAME = "lm"
METRICS = {"eval_loss": "minimize", "eval_ppl": "minimize", "eval_bpb": "minimize"}


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  text_key: str = "text"
  logits_chunk: int = 0  # see losses.token_nats
  z_loss: float = 0.0  # optim.z_loss: training's auxiliary term (losses.cross_entropy_sum)

  name = NAME
  generates = True  # samples of generated text mean something after training
  chat = False  # whether chat_prompt renders a conversation (the server's chat completions)
  attention = "causal"
  layout = PACKED
  records = "text"  # what a record is (names the tokenizer trained on the split)
  text_reference = True  # zlib on the validation text is a yardstick for bits per byte
  labels = False  # whether records carry a class label (data.label_key)
  metrics = METRICS
  sentinels = ()  # special tokens the objective adds to the tokenizer (data/tokenizer.add_sentinels)
  infills = False  # whether it fills in the middle: `infill_prompt` (a prefix and a suffix) and `end_id`

  def features(self) -> list[tuple[str, str]]:
    """(config field, record feature) pairs a split's records must have."""
    return [("data.text_key", self.text_key)]

  def sample_text(self, record) -> str:
    return as_text(record[self.text_key])

  def encode(self, records, tokenizer) -> list[Encoded]:
    texts = [as_text(r[self.text_key]) for r in records]
    return [Encoded(np.asarray(ids, np.int32), num_bytes=len(t.encode("utf-8")))
            for ids, t in zip(tokenizer.encode_batch(texts), texts)]

  def chat_prompt(self, messages) -> str | None:
    return None  # a base model has no chat format: it continues text

  def check(self, config) -> None:
    pass

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    nats, count = losses.token_nats(model, params, batch, rngs, self.logits_chunk, self.z_loss)
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


def build(config, class_names=()) -> LanguageModel:
  return LanguageModel(text_key=config.data.text_key, logits_chunk=config.model.logits_chunk,
                       z_loss=float(config.optim.z_loss))
