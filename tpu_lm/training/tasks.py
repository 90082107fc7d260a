"""What a run optimizes and how it is evaluated: a task.

The train step (step.py) is generic over the task. A task gives

- `loss(model, params, batch, rng) -> (sum, count, metrics)`: the summed loss over
  the batch and what it is summed over (tokens, examples); the step divides, and
  gradient accumulation, loss scaling and the non-finite guard never look inside;
- `eval_sums(model, params, batch) -> {name: sum}`, added up over the eval split;
- `eval_metrics(sums, num_bytes) -> {name: value}`, the logged eval record.

The language model is the first task; classification, distillation and
instruction tuning (a `loss_mask` in the batch) plug in the same way.
"""

import dataclasses
import math
from typing import Protocol

from tpu_lm.training import losses


class Task(Protocol):
  def loss(self, model, params, batch, rng): ...

  def eval_sums(self, model, params, batch) -> dict: ...

  def eval_metrics(self, sums: dict, num_bytes: int) -> dict: ...


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """Next-token cross-entropy; eval in nats/token, perplexity and bits per byte."""

  logits_chunk: int = 0  # see losses.token_nats

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    nats, count = losses.token_nats(model, params, batch, rngs, self.logits_chunk)
    return nats, count, {}

  def eval_sums(self, model, params, batch) -> dict:
    nats, count = losses.token_nats(model, params, batch, None, self.logits_chunk)
    return {"nats": nats, "tokens": count}

  def eval_metrics(self, sums: dict, num_bytes: int) -> dict:
    nats, count = float(sums["nats"]), float(sums["tokens"])
    loss = nats / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50)),
        # Per UTF-8 byte of the evaluated text: comparable across tokenizers.
        "eval_bpb": nats / math.log(2) / max(num_bytes, 1),
    }


def from_config(config) -> Task:
  return LanguageModel(logits_chunk=config.model.logits_chunk)
