"""How an objective's examples become rows (the objective chooses; data/ follows)."""

import dataclasses


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


PACKED = RowLayout()
