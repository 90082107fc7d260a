"""Token classification (tagging): one label per token, a head on every position's
final hidden state. The task built in, offline: what each token of Python source is,
by Python's own `tokenize` module (a name, a keyword, an operator, a number, a string,
a comment, or whitespace), on any corpus of Python text (the standard library by
default). A token of ours takes the class of the Python token under its first
non-whitespace character (a token of only whitespace is "space"). A document Python
cannot tokenize is read but not scored.

A decoder tags with causal attention (a token sees only what precedes it); an encoder,
fine-tuned from a masked-LM run, both ways (`task.attention`, as for classification).
Eval: accuracy, per-class and macro precision, recall and F1, the confusion matrix."""

import dataclasses
import functools
import io
import keyword
import token as token_types
import tokenize

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import RowLayout
from tpu_lm.tasks.classification import METRICS, classification_metrics

NAME = "tagging"
TAGS = ("name", "keyword", "operator", "number", "string", "comment", "space")
_SPACE = TAGS.index("space")
_BY_TYPE = {token_types.NAME: "name", token_types.OP: "operator", token_types.NUMBER: "number",
            token_types.STRING: "string", token_types.COMMENT: "comment"}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python 3.12 splits f-strings
  if hasattr(token_types, _name):
    _BY_TYPE[getattr(token_types, _name)] = "string"


def byte_tags(text: str) -> np.ndarray | None:
  """Per UTF-8 byte of `text`, the index in TAGS of the Python token it belongs to
  ("space" between tokens); None when Python cannot tokenize it."""
  data = text.encode("utf-8")
  tags = np.full(len(data), _SPACE, np.int8)
  # Byte offset of each line start, and of each character within its line.
  line_starts = [0]
  for line in text.splitlines(keepends=True):
    line_starts.append(line_starts[-1] + len(line.encode("utf-8")))
  lines = text.splitlines(keepends=True)

  def offset(row: int, col: int) -> int:
    return line_starts[row - 1] + len(lines[row - 1][:col].encode("utf-8")) if row - 1 < len(lines) else len(data)

  try:
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
      kind = _BY_TYPE.get(tok.type)
      if kind is None:
        continue
      if kind == "name" and keyword.iskeyword(tok.string):
        kind = "keyword"
      tags[offset(*tok.start):offset(*tok.end)] = TAGS.index(kind)
  except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
    return None
  return tags


@functools.lru_cache(maxsize=8)
def _lengths(tokenizer) -> np.ndarray:
  return tokenizer_lib.byte_lengths(tokenizer)


def token_tags(ids, tags_per_byte: np.ndarray, lengths_V: np.ndarray) -> np.ndarray:
  """Per token, the tag of its first byte that is not whitespace ("space" if none)."""
  ends = np.cumsum(lengths_V[np.asarray(ids, np.int64)])
  starts = ends - lengths_V[np.asarray(ids, np.int64)]
  out = np.full(len(ends), _SPACE, np.int32)
  for i, (a, b) in enumerate(zip(starts, ends)):
    spoken = tags_per_byte[a:b][tags_per_byte[a:b] != _SPACE]
    if len(spoken):
      out[i] = spoken[0]
  return out


@dataclasses.dataclass(frozen=True)
class TokenTagger:
  text_key: str = "text"
  attention: str = "causal"  # "bidirectional" to tag with an encoder (task.attention)

  name = NAME
  num_classes = len(TAGS)
  class_names = TAGS
  generates = False
  chat = False
  layout = RowLayout(loss_mask=True)  # documents packed; only tagged tokens count
  records = "text"
  text_reference = False
  labels = False  # the labels come from the text itself, not a record feature
  metrics = METRICS
  sentinels = ()
  infills = False

  def features(self) -> list[tuple[str, str]]:
    return [("data.text_key", self.text_key)]

  def sample_text(self, record) -> str:
    return as_text(record[self.text_key])

  def encode(self, records, tokenizer) -> list[Encoded]:
    """Each document's ids to read, and its tags as the targets at the same positions
    (data/stream.py: the encoder layout, targets not shifted)."""
    texts = [as_text(r[self.text_key]) for r in records]
    lengths = _lengths(tokenizer)
    out = []
    for ids, text in zip(tokenizer.encode_batch(texts), texts):
      ids = np.asarray(ids, np.int32)
      per_byte = byte_tags(text)
      if per_byte is None:
        tags, weights = np.zeros(len(ids), np.int32), np.zeros(len(ids), np.int32)
      else:
        tags, weights = token_tags(ids, per_byte, lengths), np.ones(len(ids), np.int32)
      out.append(Encoded(tags, num_bytes=len(text.encode("utf-8")), weights=weights, inputs=ids))
    return out

  def chat_prompt(self, messages) -> str | None:
    return None

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    if config.data.tokenizer == "hf":
      fail("data.tokenizer", "hf", "tagging places tokens in the text by their bytes, which needs a tokenizer tpu_lm"
                                   " makes: use 'sentencepiece' or 'bytes'")

  def _logits(self, model, params, batch, rngs):
    hidden_BxTxD = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                               rngs=rngs, method="hidden")
    return model.apply({"params": params}, hidden_BxTxD, method="classify")  # [B, T, C]

  def loss(self, model, params, batch, rng):
    import optax  # here: inference reads objectives and never imports an optimizer library

    logits_BxTxC = self._logits(model, params, batch, None if rng is None else {"dropout": rng})
    weights_BxT = batch["loss_mask"].astype(jnp.float32)
    targets_BxT = jnp.clip(batch["targets"], 0, self.num_classes - 1)  # BOS/EOS/padding: weight 0
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxC, targets_BxT)
    count = weights_BxT.sum()
    correct = ((jnp.argmax(logits_BxTxC, -1) == targets_BxT) * weights_BxT).sum()
    return (nll_BxT * weights_BxT).sum(), count, {"accuracy": correct / jnp.maximum(count, 1)}

  def eval_sums(self, model, params, batch) -> dict:
    import optax

    logits_BxTxC = self._logits(model, params, batch, None)
    weights_BxT = batch["loss_mask"].astype(jnp.float32)
    targets_BxT = jnp.clip(batch["targets"], 0, self.num_classes - 1)
    nll = (optax.softmax_cross_entropy_with_integer_labels(logits_BxTxC, targets_BxT) * weights_BxT).sum()
    true_NxC = (jax.nn.one_hot(targets_BxT, self.num_classes) * weights_BxT[..., None]).reshape(-1, self.num_classes)
    pred_NxC = jax.nn.one_hot(jnp.argmax(logits_BxTxC, -1), self.num_classes).reshape(-1, self.num_classes)
    return {"nats": nll, "confusion": true_NxC.T @ pred_NxC, "documents": batch["num_docs"].sum()}

  def eval_metrics(self, sums: dict) -> dict:
    out = classification_metrics(np.asarray(sums["confusion"]), float(sums["nats"]), self.class_names)
    out["eval_tokens"] = out.pop("eval_examples")  # what was scored: tokens
    out["eval_documents"] = int(sums["documents"])
    return out


def build(config, class_names=()) -> TokenTagger:
  return TokenTagger(text_key=config.data.text_key, attention=config.task.attention or "causal")
