"""Lines drawn as pictures (data/render.py), the offline reading task's images."""

import numpy as np
import pytest

from tpu_lm.data import render


def test_a_line_is_drawn_the_same_from_the_same_seed_and_differently_from_another():
  text = "def read_config(path):"
  a = render.render(text, np.random.default_rng(7))
  b = render.render(text, np.random.default_rng(7))
  c = render.render(text, np.random.default_rng(8))
  assert a.shape == (32, 256) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_the_text_is_ink_on_the_left_and_the_rest_is_paper():
  clean = render.Difficulty(noise=0.0, max_offset=0)
  image = render.render("x = 1", np.random.default_rng(0), clean)
  ink = image < 128
  assert ink[:, :40].sum() > 20 and not ink[:, 60:].any()
  assert render.render("", np.random.default_rng(0), clean).min() == 255  # nothing written: all paper


def test_fits_counts_the_characters_the_canvas_shows():
  d = render.Difficulty(width=64)
  assert render.fits("ab", 14, d) == 2
  n = render.fits("x" * 100, 14, d)
  assert 0 < n < 100 and render._font(14).getlength("x" * n) <= 64 - d.max_offset < render._font(14).getlength(
      "x" * (n + 1))


@pytest.mark.parametrize("fields, message", [
    ({"min_font": 20, "max_font": 14}, "font sizes 20..14"),
    ({"max_font": 30, "max_offset": 4}, "does not fit 32 pixels"),
    ({"noise": -0.1}, "must be >= 0"),
])
def test_impossible_difficulties_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    render.Difficulty(**fields).check()
