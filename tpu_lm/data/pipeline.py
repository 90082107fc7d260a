"""The input pipeline as the training loop sees it: a split, its checkpointable
train iterator, its eval batches and sample prompts (the streaming is stream.py).

A `Split` is a document source (documents.py), how its records become tokens
(encode.py: the objective says), the tokenizer's BOS/EOS and the objective's row
layout (layout.py). Nothing is tokenized ahead: each
process reads and tokenizes the documents of its own rows as training reaches
them, so neither memory nor start-up time grows with the corpus.
"""

import dataclasses

import numpy as np

from tpu_lm.data import documents, stream
from tpu_lm.data.encode import Encoder
from tpu_lm.data.layout import PACKED, RowLayout


@dataclasses.dataclass(frozen=True)
class Split:
  source: object
  encoder: Encoder
  bos_id: int
  eos_id: int
  layout: RowLayout = PACKED  # the objective's: packed documents or one example per row, a loss mask or not

  def __len__(self):
    return len(self.source)

  @classmethod
  def of_tokens(cls, docs, bos_id: int = 1, eos_id: int = 2, num_bytes=None) -> "Split":
    """Documents given as token ids (tests; corpora tokenized elsewhere)."""
    return cls(documents.TokenSource(docs, num_bytes), Encoder(None), bos_id, eos_id)


def _options(split: Split) -> dict:
  return {"bos_id": split.bos_id, "eos_id": split.eos_id, "one_per_row": split.layout.one_per_row,
          "loss_mask": split.layout.loss_mask, "image": split.layout.image}


def train_iter(split: Split, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, block_docs: int = 128) -> stream.Loader:
  return stream.Loader(split.source, split.encoder, seq_len=seq_len, global_batch=global_batch, seed=seed,
                       process_index=process_index, process_count=process_count, block_docs=block_docs,
                       **_options(split))


def eval_batches(split: Split, *, seq_len: int, global_batch: int, max_batches: int = 0, process_index: int = 0,
                 process_count: int = 1, on_progress=None):
  """(this process's rows of an eval batch, done here) until the split (or
  `max_batches`) is used up; `on_progress(fraction)` after each."""
  return stream.eval_rows(split.source, split.encoder, seq_len=seq_len, global_batch=global_batch,
                          max_batches=max_batches, process_index=process_index, process_count=process_count,
                          on_progress=on_progress, **_options(split))


def first_tokens(split: Split, num: int, length: int) -> np.ndarray:
  return stream.first_tokens(split.source, split.encoder, split.bos_id, num, length)
