"""Lines of text drawn as pictures: the images of the offline reading (OCR) task, made
on the fly from the default corpus so nothing is downloaded.

A line is drawn in Pillow's bundled font (FreeType; the same glyphs on every machine
with Pillow >= 10.1) at a size, offset and noise level drawn from a generator the
caller seeds (a document's key: the same picture on a resumed run), dark on light,
into a fixed [height, width] grayscale canvas. `Difficulty` is the config's knob: a
larger font range, offsets and noise make the task harder; text wider than the canvas
is cut where the canvas ends, and `fits` says how much of a line is visible.
"""

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Difficulty:
  height: int = 32
  width: int = 256
  min_font: int = 14  # pixels
  max_font: int = 18
  max_offset: int = 4  # the text's top-left corner moves up to this many pixels right and down
  noise: float = 0.1  # standard deviation of Gaussian pixel noise, as a share of full scale

  def check(self) -> None:
    if not 0 < self.min_font <= self.max_font:
      raise ValueError(f"font sizes {self.min_font}..{self.max_font}: need 0 < min <= max")
    if self.max_font + self.max_offset > self.height:
      raise ValueError(f"a {self.max_font}-pixel font at offset {self.max_offset} does not fit {self.height} pixels")
    if self.noise < 0 or self.max_offset < 0:
      raise ValueError("noise and max_offset must be >= 0")


@functools.lru_cache(maxsize=32)
def _font(size: int):
  from PIL import ImageFont

  return ImageFont.load_default(size=size)


def fits(text: str, size: int, difficulty: Difficulty) -> int:
  """How many characters of `text` a line at font `size` shows before the canvas ends
  (with the largest offset)."""
  font = _font(size)
  room = difficulty.width - difficulty.max_offset
  lo, hi = 0, len(text)
  while lo < hi:  # the longest prefix whose right edge is inside the canvas
    mid = (lo + hi + 1) // 2
    if font.getlength(text[:mid]) <= room:
      lo = mid
    else:
      hi = mid - 1
  return lo


def render(text: str, rng: np.random.Generator, difficulty: Difficulty = Difficulty()) -> np.ndarray:
  """[height, width] uint8 grayscale: `text` (one line; tabs as four spaces) drawn at a
  size and offset, with noise, all drawn from `rng` (always the same number of draws)."""
  from PIL import Image, ImageDraw

  d = difficulty
  size = int(rng.integers(d.min_font, d.max_font + 1))
  dx, dy = (int(v) for v in rng.integers(0, d.max_offset + 1, 2))
  noise = rng.normal(0.0, d.noise * 255.0, (d.height, d.width))
  image = Image.new("L", (d.width, d.height), 255)
  ImageDraw.Draw(image).text((dx, dy), text.replace("\t", "    "), font=_font(size), fill=0)
  pixels = np.asarray(image, np.float64) + noise
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
