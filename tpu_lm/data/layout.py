"""How an objective's examples become rows (the objective chooses; data/ follows)."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """`one_per_row`: each row one example, cut to the row; else documents packed end to
  end, split across rows where they do not fit. `loss_mask`: rows carry which targets
  count (an example whose `weights` leave some out); one example per row with a loss
  mask is read as (input, next-token target) pairs, without one whole (a classifier's,
  its label beside it). `image`: (height, width, channels) of the image every row
  carries (`image`, uint8, and `image_row`, whether the row has one: a text-only row's
  is zeros); then rows also carry `prefix`, which positions are read both ways (the
  image, BOS and any prompt: a prefix LM's)."""

  one_per_row: bool = False
  loss_mask: bool = False
  image: tuple = ()

  def row_fields(self, seq_len: int) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape, dtype) of each field of a training row (stream.py builds them): what a
    step is compiled for before any data exists (--compile_for)."""
    t = (seq_len,)
    fields = {"inputs": (t, np.int32), "segment_ids": (t, np.int32), "positions": (t, np.int32)}
    if self.one_per_row and not self.loss_mask:
      fields["label"] = ((), np.int32)  # a classifier's: the whole example read, its class beside it
    else:
      fields["targets"] = (t, np.int32)
    if self.loss_mask:
      fields["loss_mask"] = (t, np.int32)
    if self.image:
      fields.update(image=(tuple(self.image), np.uint8), image_row=((), np.bool_), prefix=(t, np.bool_))
    return fields


PACKED = RowLayout()
