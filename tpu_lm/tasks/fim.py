"""Fill in the middle (Bavarian et al. 2022, "Efficient Training of Language Models to
Fill in the Middle"): the causal language model, trained on documents of which a
share (`fim.rate`) is cut at two random characters into prefix, middle and suffix and
rearranged so that the middle comes last:

  PSM  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|fim_end|>
  SPM  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle <|fim_end|>

(SPM, with probability `fim.spm_rate`, is the paper's variant that keeps prefix and
middle adjacent.) The sentinels are the tokenizer's own ids past its vocabulary
(data/tokenizer.add_sentinels): no text encodes to them. Each piece is tokenized on its
own, after the cut, as at inference, where a prefix and a suffix arrive as text. The
loss covers every token, so the model still learns to continue text left to right;
eval is left to right on untouched documents, comparable with a plain run's.

Which documents are cut and where comes from a generator seeded by the document's key
(data/encode.Encoder): the same on a resumed run. The cut is per document (the
paper's document-level FIM), before packing.

At inference a prefix and a suffix become `infill_prompt` (PSM), and the middle ends
at `end_id`.
"""

import dataclasses

import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.tasks.causal_lm import LanguageModel

NAME = "fim"
PREFIX, SUFFIX, MIDDLE, END = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_end|>"
SENTINELS = (PREFIX, SUFFIX, MIDDLE, END)


def cut(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
  """(prefix, middle, suffix) at two character positions drawn uniformly."""
  a, b = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
  return text[:a], text[a:b], text[b:]


@dataclasses.dataclass(frozen=True)
class FillInMiddle(LanguageModel):
  rate: float = 0.5
  spm_rate: float = 0.5

  name = NAME
  sentinels = SENTINELS
  infills = True
  randomized = True  # training documents are cut at random: Encoder passes a generator per record

  def encode(self, records, tokenizer, rngs=None) -> list[Encoded]:
    if rngs is None:  # eval, sample prompts: documents as they are
      return super().encode(records, tokenizer)
    texts = [as_text(r[self.text_key]) for r in records]
    plans = []  # per document: None (left to right), or (spm, prefix, middle, suffix)
    for text, rng in zip(texts, rngs):
      # Both draws are made for every document, so one's choice never shifts another's.
      fim, spm = rng.random() < self.rate, rng.random() < self.spm_rate
      plans.append((spm, *cut(text, rng)) if fim else None)
    pieces = [piece for text, plan in zip(texts, plans) for piece in ([text] if plan is None else plan[1:])]
    ids = iter(tokenizer.encode_batch(pieces))
    s = tokenizer.sentinels
    out = []
    for text, plan in zip(texts, plans):
      if plan is None:
        doc = list(next(ids))
      else:
        spm = plan[0]
        prefix, middle, suffix = (list(next(ids)) for _ in range(3))
        if spm:
          doc = [s[PREFIX], s[SUFFIX], *suffix, s[MIDDLE], *prefix, *middle, s[END]]
        else:
          doc = [s[PREFIX], *prefix, s[SUFFIX], *suffix, s[MIDDLE], *middle, s[END]]
      out.append(Encoded(np.asarray(doc, np.int32), num_bytes=len(text.encode("utf-8"))))
    return out

  def infill_prompt(self, tokenizer, prefix: str, suffix: str) -> list[int]:
    """The ids that ask for the text between `prefix` and `suffix` (PSM, after the run's
    BOS as every training document began); the model answers with the middle, then
    `end_id`."""
    s = tokenizer.sentinels
    before, after = tokenizer.encode_batch([prefix, suffix])
    return [tokenizer.bos_id, s[PREFIX], *map(int, before), s[SUFFIX], *map(int, after), s[MIDDLE]]

  def end_id(self, tokenizer) -> int:
    return tokenizer.sentinels[END]

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    for name in ("rate", "spm_rate"):
      value = config.fim[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        fail(f"fim.{name}", value, "it must be a probability in [0, 1]")
    if config.data.tokenizer == "hf":
      fail("data.tokenizer", "hf", "fill-in-the-middle adds its sentinels to a tokenizer tpu_lm makes: use"
                                   " 'sentencepiece' or 'bytes'")


def build(config, class_names=()) -> FillInMiddle:
  return FillInMiddle(text_key=config.data.text_key, logits_chunk=config.model.logits_chunk,
                      rate=float(config.fim.rate), spm_rate=float(config.fim.spm_rate))
