"""Records -> token ids, on the fly: the objective says what a record becomes
(tasks/), this runs it in batches so the tokenizer's own threads (SentencePiece,
Hugging Face tokenizers) tokenize many documents per call."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Encoded:
  ids: np.ndarray  # the document's ids, without BOS/EOS
  num_bytes: int = 0  # UTF-8 bytes of what the loss covers (bits per byte)
  label: int = 0  # classification
  weights: np.ndarray | None = None  # per id, as a target: 1 counts, 0 not (None: all count)
  # What the model reads at each position where that differs from what it predicts (a
  # masked LM: the document with its chosen tokens masked). Then each position's target
  # is its own id, not the next one (data/stream.py), and BOS and EOS are read, never scored.
  inputs: np.ndarray | None = None
  # An image the document is read after (a vision-language model's, tasks/reading.py):
  # pixels [H, W, C] uint8. Its `image_slots` positions come first in the row, before
  # BOS; the model's vision encoder fills them (model/transformer.py), nothing predicts them.
  image: np.ndarray | None = None
  image_slots: int = 0
  # Ids at the start of `ids` read both ways with the image and BOS (a prefix LM's
  # prompt: the row's `prefix`); what follows is causal.
  prefix: int = 0


def as_text(value) -> str:
  """A record's text feature (bytes from TFDS, str from files) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """`objective.encode(records, tokenizer)`, or the records as they are when they
  hold ids already (documents.TokenSource: tests, corpora tokenized elsewhere).

  `randomize` (a training split's encoder): an objective that transforms documents at
  random (`objective.randomized`, fill-in-the-middle) gets one generator per record,
  seeded by its key (seed, epoch, document index), so a document reads the same
  however the run was stopped and resumed, on any number of processes. Without keys
  (eval, sample prompts) records are encoded as they are."""

  tokenizer: object
  objective: object = None
  randomize: bool = False

  def __call__(self, records: list[dict], keys=()) -> list[Encoded]:
    if not records:
      return []
    if "ids" in records[0]:
      return [Encoded(np.asarray(r["ids"]), num_bytes=int(r["num_bytes"])) for r in records]
    if self.randomize and keys and getattr(self.objective, "randomized", False):
      rngs = [np.random.default_rng([int(k) for k in key]) for key in keys]
      return self.objective.encode(records, self.tokenizer, rngs)
    return self.objective.encode(records, self.tokenizer)
