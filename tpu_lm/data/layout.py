"""How an objective's examples become rows (the objective chooses; data/ follows)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """`one_per_row`: each row one example, cut to the row (a classifier's); else
  documents packed end to end, split across rows where they do not fit. `loss_mask`:
  rows carry which targets count (an example whose `weights` leave some out)."""

  one_per_row: bool = False
  loss_mask: bool = False


PACKED = RowLayout()
