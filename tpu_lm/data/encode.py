"""Records -> token ids, on the fly: how a document of each kind becomes a training
example. Batched, so the tokenizer's own threads (SentencePiece, Hugging Face
tokenizers) tokenize many documents per call."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Encoded:
  ids: np.ndarray  # the document's ids, without BOS/EOS
  prompt_len: int = 0  # instructions: the first this many ids are the prompt (not targets)
  label: int = 0  # classification
  num_bytes: int = 0  # UTF-8 bytes of what the loss covers (bits per byte)


def as_text(value) -> str:
  """A record's text feature (bytes from TFDS, str from files) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """`kind`: "text" (a document), "instructions" (prompt + completion, loss on the
  completion; the prompt written into `chat_template` at "{prompt}", as the server's
  chat completions write a conversation, inference/chat.py) or "classification"
  (text + integer label)."""

  tokenizer: object
  kind: str = "text"
  text_key: str = "text"
  label_key: str = "label"
  chat_template: str = "{prompt}"

  def __call__(self, records: list[dict]) -> list[Encoded]:
    if not records:
      return []
    if "ids" in records[0]:  # already tokenized (documents.TokenSource)
      return [Encoded(np.asarray(r["ids"]), num_bytes=int(r["num_bytes"])) for r in records]
    dtype = np.int32
    if self.kind == "instructions":
      # replace, not str.format: braces in a prompt are text
      prompts = [self.chat_template.replace("{prompt}", as_text(r["prompt"])) for r in records]
      completions = [as_text(r["completion"]) for r in records]
      ps, cs = self.tokenizer.encode_batch(prompts), self.tokenizer.encode_batch(completions)
      return [Encoded(np.concatenate([np.asarray(p, dtype), np.asarray(c, dtype)]), len(p),
                      num_bytes=len(t.encode("utf-8"))) for p, c, t in zip(ps, cs, completions)]
    texts = [as_text(r[self.text_key]) for r in records]
    ids = self.tokenizer.encode_batch(texts)
    labels = [int(r[self.label_key]) for r in records] if self.kind == "classification" else [0] * len(texts)
    return [Encoded(np.asarray(i, dtype), label=lab, num_bytes=len(t.encode("utf-8")))
            for i, lab, t in zip(ids, labels, texts)]
