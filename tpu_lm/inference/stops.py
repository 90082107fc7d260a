"""Stop sequences: where a completion's text ends, for a whole text or one streamed
piece by piece (the server and `generate` alike). The text is cut here, at the
first stop sequence; decoding stops at the step it appears (the server halts the
sequence, `generate` ends the row)."""

from tpu_lm.data.tokenizer import TextStream


class StopScanner:
  """Streamed text in, text safe to send out: holds back a tail that could begin a
  stop sequence, and after one appears passes nothing more (`stopped`)."""

  def __init__(self, stop: tuple[str, ...]):
    self.stop, self.stopped, self._held = stop, False, ""
    self._keep = max((len(x) for x in stop), default=1) - 1

  def push(self, text: str) -> str:
    if self.stopped or not self.stop:
      return "" if self.stopped else text
    self._held += text
    cut = first_stop(self._held, self.stop)
    if cut is not None:
      out, self._held, self.stopped = self._held[:cut], "", True
      return out
    split = max(len(self._held) - self._keep, 0)
    out, self._held = self._held[:split], self._held[split:]
    return out

  def finish(self) -> str:
    out, self._held = ("" if self.stopped else self._held), ""
    return out

  def end(self) -> str:
    """The sequence's own end (an end token): what is held back is text, then nothing more."""
    out = self.finish()
    self.stopped = True
    return out


def first_stop(text: str, stop) -> int | None:
  hits = [i for i in (text.find(x) for x in stop) if i >= 0]
  return min(hits) if hits else None


class StoppedText:
  """One completion's text as its tokens arrive: detokenized, cut at the first stop
  sequence or at `end_id` (an infill's end of middle), whichever comes first
  (`generate`'s rows, inference/complete.py's completions)."""

  def __init__(self, tokenizer, stop: tuple[str, ...], end_id: int | None = None):
    self._stream, self.stops, self.text = TextStream(tokenizer), StopScanner(stop), ""
    self._end_id, self.ended = end_id, False

  def push(self, token: int) -> str:
    if token == self._end_id and not self.stops.stopped:
      self.ended = True
      return self._add(self.stops.push(self._stream.finish()) + self.stops.end())
    return self._add(self.stops.push(self._stream.push(token)))

  def finish(self) -> str:
    return self._add(self.stops.push(self._stream.finish()) + self.stops.finish())

  def _add(self, piece: str) -> str:
    self.text += piece
    return piece
