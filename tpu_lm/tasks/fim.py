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
(data/encode.Encoder): the same on a resumed run. The unit is a whole document (the
paper's document-level FIM), or with `fim.max_chars` a piece of one: the document is
first divided at line ends into pieces of at most that many characters, each
transformed on its own, one after the other. A document much longer than a training
row (a source file is thousands of tokens, a row 256) otherwise has its prefix, suffix
and middle in different rows, so the model rarely sees the three together and never
learns to infill from both sides; pieces that fit a row are the paper's context-level
FIM in effect, decided before packing.

At inference a prefix and a suffix become `infill_prompt`, and the middle ends at
`end_id`. A run trained in both orders is prompted in SPM, as the paper recommends:
the middle then continues the prefix directly, where PSM asks the model to reach back
past the whole suffix to the prefix's end (measured on the base, one masked line of
held-out code: the true line costs 1.473 bits/byte after an SPM prompt, 1.542 after a
PSM one, 1.490 after the prefix alone; experiments/fim).
"""

import dataclasses

import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.tasks.causal_lm import LanguageModel

NAME = "fim"
PREFIX, SUFFIX, MIDDLE, END = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_end|>"
SENTINELS = (PREFIX, SUFFIX, MIDDLE, END)


def pieces(text: str, max_chars: int) -> list[str]:
  """`text` divided at line ends into pieces of at most `max_chars` characters (a longer
  line is a piece of its own); [text] when `max_chars` is 0."""
  if not max_chars or len(text) <= max_chars:
    return [text]
  out, current = [], ""
  for line in text.splitlines(keepends=True):
    if current and len(current) + len(line) > max_chars:
      out.append(current)
      current = ""
    current += line
  return out + [current] if current else out


def cut(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
  """(prefix, middle, suffix) at two character positions drawn uniformly."""
  a, b = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
  return text[:a], text[a:b], text[b:]


@dataclasses.dataclass(frozen=True)
class FillInMiddle(LanguageModel):
  rate: float = 0.5
  spm_rate: float = 0.5
  max_chars: int = 0  # the unit transformed: a whole document (0), or its pieces of at most this many characters

  name = NAME
  sentinels = SENTINELS
  infills = True
  randomized = True  # training documents are cut at random: Encoder passes a generator per record

  def encode(self, records, tokenizer, rngs=None) -> list[Encoded]:
    if rngs is None:  # eval, sample prompts: documents as they are
      return super().encode(records, tokenizer)
    texts = [as_text(r[self.text_key]) for r in records]
    plans = []  # per document, per unit: (None, text) left to right, or (spm, prefix, middle, suffix)
    for text, rng in zip(texts, rngs):
      units = []
      for unit in pieces(text, self.max_chars):
        # Both draws are made for every unit, so one's choice never shifts another's.
        fim, spm = rng.random() < self.rate, rng.random() < self.spm_rate
        units.append((spm, *cut(unit, rng)) if fim else (None, unit))
      plans.append(units)
    ids = iter(tokenizer.encode_batch([part for units in plans for unit in units for part in unit[1:]]))
    s = tokenizer.sentinels
    out = []
    for text, units in zip(texts, plans):
      doc = []
      for unit in units:
        if unit[0] is None:
          doc += list(next(ids))
          continue
        prefix, middle, suffix = (list(next(ids)) for _ in range(3))
        if unit[0]:  # SPM
          doc += [s[PREFIX], s[SUFFIX], *suffix, s[MIDDLE], *prefix, *middle, s[END]]
        else:
          doc += [s[PREFIX], *prefix, s[SUFFIX], *suffix, s[MIDDLE], *middle, s[END]]
      out.append(Encoded(np.asarray(doc, np.int32), num_bytes=len(text.encode("utf-8"))))
    return out

  def infill_prompt(self, tokenizer, prefix: str, suffix: str, order: str = "") -> list[int]:
    """The ids that ask for the text between `prefix` and `suffix`, after the run's BOS as
    every training document began: in `order` ("spm" or "psm"; default SPM, or PSM for
    a run trained with fim.spm_rate=0). The model answers with the middle, then `end_id`."""
    s = tokenizer.sentinels
    before, after = ([int(t) for t in ids] for ids in tokenizer.encode_batch([prefix, suffix]))
    if (order or ("spm" if self.spm_rate > 0 else "psm")) == "spm":
      return [tokenizer.bos_id, s[PREFIX], s[SUFFIX], *after, s[MIDDLE], *before]
    return [tokenizer.bos_id, s[PREFIX], *before, s[SUFFIX], *after, s[MIDDLE]]

  def end_id(self, tokenizer) -> int:
    return tokenizer.sentinels[END]

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    for name in ("rate", "spm_rate"):
      value = config.fim[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        fail(f"fim.{name}", value, "it must be a probability in [0, 1]")
    if isinstance(config.fim.max_chars, bool) or not isinstance(config.fim.max_chars, int) or config.fim.max_chars < 0:
      fail("fim.max_chars", config.fim.max_chars, "it must be a whole number of characters >= 0 (0: whole documents)")
    if config.data.tokenizer == "hf":
      fail("data.tokenizer", "hf", "fill-in-the-middle adds its sentinels to a tokenizer tpu_lm makes: use"
                                   " 'sentencepiece' or 'bytes'")


def build(config, class_names=()) -> FillInMiddle:
  return FillInMiddle(text_key=config.data.text_key, logits_chunk=config.model.logits_chunk,
                      z_loss=float(config.optim.z_loss),
                      rate=float(config.fim.rate), spm_rate=float(config.fim.spm_rate),
                      max_chars=int(config.fim.max_chars))
