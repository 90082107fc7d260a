"""The ViT image encoder and projector (model/vision.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from tpu_lm.model import vision


def test_patches_are_cut_in_reading_order():
  images = jnp.arange(2 * 4 * 6 * 1).reshape(2, 4, 6, 1)
  patches = vision.patchify(images, 2)
  assert patches.shape == (2, 6, 4)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 6, 7])  # top-left 2x2, row-major
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 8, 9])  # its right neighbour
  np.testing.assert_array_equal(patches[0, 3], [12, 13, 18, 19])  # first of the second row


def test_every_patch_sees_the_whole_image_and_lands_in_the_decoders_width():
  cfg = vision.VisionConfig(image_height=16, image_width=32, out_dim=24, patch=8, num_layers=2, d_model=32,
                            num_heads=4, mlp_dim=64, projector="mlp")
  cfg.check()
  encoder = vision.VisionEncoder(cfg)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 32, 1), minval=-1, maxval=1)
  params = meta.unbox(encoder.init(jax.random.key(1), images)["params"])
  out = encoder.apply({"params": params}, images)
  assert out.shape == (2, cfg.num_patches, 24) == (2, 8, 24)
  changed = encoder.apply({"params": params}, images.at[0, 8:, 24:].set(1.0)) - out  # the last patch only
  assert jnp.abs(changed[0, 0]).max() > 1e-5  # the first patch's state sees it: attention both ways
  assert jnp.abs(changed[1]).max() == 0  # images of a batch never mix
  linear = vision.VisionEncoder(dataclasses.replace(cfg, projector="linear"))
  shapes = jax.eval_shape(lambda: linear.init_with_output(jax.random.key(1), images))
  assert shapes[0].shape == (2, 8, 24) and "projector" in shapes[1]["params"]


@pytest.mark.parametrize("fields, message", [
    ({"image_height": 30}, "does not cut into 8-pixel patches"),
    ({"num_heads": 5}, "does not split into 5 heads"),
    ({"projector": "qformer"}, "use 'linear' or 'mlp'"),
])
def test_impossible_shapes_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    vision.VisionConfig(**{"image_height": 32, "image_width": 64, "out_dim": 16, **fields}).check()
