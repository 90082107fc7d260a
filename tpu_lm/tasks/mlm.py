"""The masked language model, an encoder's objective (BERT, Devlin et al. 2019; with
RoBERTa's dynamic masking, Liu et al. 2019): each token of a training document is
chosen with probability `rate`; a chosen token is read as the tokenizer's <mask> 80%
of the time, as a random token 10%, as itself 10%; the loss is the cross-entropy of
the chosen tokens alone, each predicted at its own position by a model that attends
both ways within its document (the "bidirectional" mask kind: segment ids keep the
packed documents apart). With `whole_word`, the choice is made per word (a run of
tokens with no boundary between them, as whole-word masking in BERT's later
checkpoints), and every token of a chosen word is corrupted.

The choices come from a generator seeded by the document's key (data/encode.Encoder),
so a document is masked anew each epoch (dynamic masking) and the same way on a
resumed run. Eval documents are masked by a generator seeded by their own text: a
fixed mask, the same in every eval of every run, so numbers compare across runs.

Eval: loss in nats and bits per masked token, perplexity, and masked-token accuracy
(argmax equals the original token).
"""

import dataclasses
import functools
import math
import zlib

import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import RowLayout
from tpu_lm.tasks import losses

NAME = "mlm"
MASK = "<mask>"
METRICS = {"eval_loss": "minimize", "eval_accuracy": "maximize", "eval_bits_per_token": "minimize",
           "eval_ppl": "minimize"}


@functools.lru_cache(maxsize=8)
def word_edges(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Per id: whether its text begins, and whether it ends, with a word character
  (letter, digit, underscore). A token continues the word before it when it begins with
  one and the token before ends with one: "self" + "_name" is one word, "self" + "."
  two. Special and sentinel ids have no text: boundaries."""
  first, last = np.zeros(tokenizer.vocab_size, bool), np.zeros(tokenizer.vocab_size, bool)
  sentinels = set(tokenizer.sentinels.values())
  for i in range(tokenizer.vocab_size):
    text = "" if i in sentinels else tokenizer.decode([i])
    if text:
      first[i], last[i] = _word_char(text[0]), _word_char(text[-1])
  return first, last


@functools.lru_cache(maxsize=8)
def random_replacements(tokenizer) -> np.ndarray:
  """The ids a chosen token may be replaced by: any but the special ones (a Hugging Face
  tokenizer's mask is inside its vocabulary, ours past it). Once per tokenizer: encoding
  runs per batch of documents."""
  special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.sentinels.values()}
  out = np.array([i for i in range(tokenizer.vocab_size) if i not in special], np.int64)
  out.setflags(write=False)  # shared by every call
  return out


def _word_char(c: str) -> bool:
  return c.isalnum() or c == "_"


def mask_document(ids, rng: np.random.Generator, *, rate: float, mask_id: int, replacements: np.ndarray,
                  word_starts=None) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, chosen): `ids` with the chosen tokens corrupted (80% `mask_id`, 10% an id
  drawn from `replacements`, 10% kept), and 1 where a token was chosen. `word_starts`
  (bool per id, True where a word begins): choose whole words. The same number of draws
  whatever is chosen, so no choice shifts another."""
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  choose, how, random_ids = rng.random(n), rng.random(n), rng.choice(replacements, n)
  if word_starts is None:
    chosen = choose < rate
  else:  # each token takes the draw of the first token of its word
    word = np.cumsum(word_starts) - 1
    first = np.flatnonzero(word_starts)
    chosen = (choose[first] < rate)[word] if n else np.zeros(0, bool)
  inputs = np.where(chosen & (how < 0.8), mask_id, np.where(chosen & (how < 0.9), random_ids, ids))
  return inputs.astype(np.int32), chosen.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  text_key: str = "text"
  rate: float = 0.15
  whole_word: bool = False
  logits_chunk: int = 0  # see losses.token_nats
  z_loss: float = 0.0

  name = NAME
  generates = False  # nothing to sample left to right: `generate --fill_mask` fills masks instead
  chat = False
  attention = "bidirectional"
  layout = RowLayout(loss_mask=True)  # the chosen tokens are the targets
  records = "text"
  text_reference = False  # bits per masked token, not per byte: zlib is no yardstick
  labels = False
  metrics = METRICS
  sentinels = (MASK,)
  infills = False
  randomized = True  # Encoder passes a generator per training record

  def features(self) -> list[tuple[str, str]]:
    return [("data.text_key", self.text_key)]

  def sample_text(self, record) -> str:
    return as_text(record[self.text_key])

  def encode(self, records, tokenizer, rngs=None) -> list[Encoded]:
    texts = [as_text(r[self.text_key]) for r in records]
    if rngs is None:  # eval: a mask fixed by the document's own text
      rngs = [np.random.default_rng(zlib.crc32(t.encode("utf-8"))) for t in texts]
    replacements = random_replacements(tokenizer)
    first = last = None
    if self.whole_word:
      first, last = word_edges(tokenizer)
    out = []
    for ids, text, rng in zip(tokenizer.encode_batch(texts), texts, rngs):
      ids = np.asarray(ids, np.int32)
      starts = None
      if self.whole_word:
        starts = np.ones(len(ids), bool)
        starts[1:] = ~(first[ids[1:]] & last[ids[:-1]])
      inputs, chosen = mask_document(ids, rng, rate=self.rate, mask_id=tokenizer.sentinels[MASK],
                                     replacements=replacements, word_starts=starts)
      out.append(Encoded(ids, num_bytes=len(text.encode("utf-8")), weights=chosen, inputs=inputs))
    return out

  def chat_prompt(self, messages) -> str | None:
    return None

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    rate = config.mlm.rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
      fail("mlm.rate", rate, "it must be the share of tokens chosen, in (0, 1] (BERT's is 0.15)")

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    nats, count = losses.token_nats(model, params, batch, rngs, self.logits_chunk, self.z_loss)
    return nats, count, {}

  def eval_sums(self, model, params, batch) -> dict:
    return losses.scored_token_sums(model, params, batch)

  def eval_metrics(self, sums: dict) -> dict:
    nats, count = float(sums["nats"]), float(sums["tokens"])
    loss = nats / max(count, 1)
    return {"eval_loss": loss, "eval_bits_per_token": loss / math.log(2), "eval_ppl": math.exp(min(loss, 50)),
            "eval_accuracy": float(sums["correct"]) / max(count, 1),
            "eval_tokens": int(count), "eval_documents": int(sums["documents"])}


def build(config, class_names=()) -> MaskedLM:
  return MaskedLM(text_key=config.data.text_key, rate=float(config.mlm.rate), whole_word=bool(config.mlm.whole_word),
                  logits_chunk=config.model.logits_chunk, z_loss=float(config.optim.z_loss))
