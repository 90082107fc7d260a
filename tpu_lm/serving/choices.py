"""A response's choices as their tokens arrive: the text (detokenized, held back where
it could begin a stop sequence, ended at one), the log-probabilities in OpenAI's
shapes, the prompt's own scores for echo, and the usage counts."""

from tpu_lm.data.tokenizer import TextStream
from tpu_lm.inference.slots import TOP_LOGPROBS
from tpu_lm.inference.stops import StopScanner
from tpu_lm.serving.requests import Request


class ChoiceText:
  """One choice's text as its tokens arrive: detokenized, held back where it could
  begin a stop sequence, ended at one; with the tokens' log-probabilities."""

  def __init__(self, tokenizer, stop: tuple[str, ...], prefix: str, prefix_logprobs=()):
    self._tok, self._text, self._stops = tokenizer, TextStream(tokenizer), StopScanner(stop)
    self.pending = prefix  # the echoed prompt, sent with the first piece
    self.text = ""  # released so far
    # (token, (logprob, [(id, logprob), ...])) of tokens not yet reported; an echoed
    # prompt's first (logprob None: it has no context).
    self.logprobs = list(prefix_logprobs)

  @property
  def stopped(self) -> bool:
    return self._stops.stopped

  def push(self, token: int, logprobs) -> str:
    if not self.stopped and logprobs is not None:
      self.logprobs.append((token, logprobs))
    return self._release(self._stops.push(self._text.push(token)))

  def finish(self) -> str:
    return self._release(self._stops.push(self._text.finish()) + self._stops.finish())

  def _release(self, piece: str) -> str:
    piece, self.pending = self.pending + piece, ""
    self.text += piece
    return piece

  def take_logprobs(self, request: Request, offset: int) -> dict | None:
    """The logprobs object of the tokens gathered since the last call (OpenAI's shapes)."""
    if request.logprobs is None:
      return None
    entries, self.logprobs = self.logprobs, []
    k = request.logprobs
    word = lambda t: self._tok.decode([t])  # noqa: E731
    if request.chat:
      return {"content": [{"token": word(t), "logprob": lp, "bytes": list(word(t).encode()),
                           "top_logprobs": [{"token": word(a), "logprob": alp, "bytes": list(word(a).encode())}
                                            for a, alp in top[:k]]} for t, (lp, top) in entries]}
    offsets = []
    for t, _ in entries:
      offsets.append(offset)
      offset += len(word(t))
    return {"tokens": [word(t) for t, _ in entries], "token_logprobs": [lp for _, (lp, _) in entries],
            "top_logprobs": [None if top is None else {word(a): alp for a, alp in top[:k]} for _, (_, top) in entries],
            "text_offset": offsets}


def prompt_logprobs(run, request: Request, greedy_next: bool = False) -> list[tuple[list, tuple | None]]:
  """Per prompt, its echoed tokens' logprob entries as ChoiceText holds them (the ids
  the server added before a text prompt are context, not echoed; a token-id prompt's
  first id has no context: None), and with `greedy_next` the entry of the likeliest
  next token: one pass of the one scoring function (inference/score.py) over the
  prompt and one more position."""
  rows = [[*ids, run.tokenizer.eos_id] if greedy_next else ids for ids in request.ids]  # any id: its position's
  scored = iter(run.score([r for r in rows if len(r) > 1], top=TOP_LOGPROBS))  # alternatives are the next token's
  out = []
  for row, lead in zip(rows, request.lead):
    s = next(scored) if len(row) > 1 else None  # a text prompt "" is its BOS alone: nothing to score
    entries = [(row[0], (None, None))] + ([] if s is None else [
        (t, (float(lp), list(zip(map(int, top_i), map(float, top_lp)))))
        for t, lp, top_i, top_lp in zip(row[1:], s.logprobs, s.top_ids, s.top_logprobs)])
    following = None
    if greedy_next:
      top = entries.pop()[1][1]
      following = (top[0][0], (top[0][1], top))
    out.append((entries[lead:], following))
  return out



def speculative_usage(completions) -> dict | None:
  """A request's draft tokens accepted and proposed, over its choices (served with a draft model)."""
  counts = [c.speculative for c in completions if c.speculative]
  if not counts:
    return None
  return {"draft_tokens": counts[0]["draft_tokens"], "accepted": sum(c["accepted"] for c in counts),
          "proposed": sum(c["proposed"] for c in counts)}



def choice(request: Request, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
            final: bool = False) -> dict:
  """One choice of a response (`final`) or of a streamed chunk, completion or chat."""
  if not request.chat:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
  if final:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": logprobs}
  return {"index": index, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
          "logprobs": logprobs}
