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
  strips = vision.patchify(images, 2, patch_height=4)  # full-height strips, two pixels wide
  assert strips.shape == (2, 3, 8)
  np.testing.assert_array_equal(strips[0, 1], [2, 3, 8, 9, 14, 15, 20, 21])


@pytest.mark.slow  # the vision-language tests below run the encoder too
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
    ({"image_height": 30}, "does not cut into 8x8-pixel patches"),
    ({"patch_height": 32, "image_height": 16}, "does not cut into 32x8-pixel patches"),
    ({"num_heads": 5}, "does not split into 5 heads"),
    ({"projector": "qformer"}, "use 'linear' or 'mlp'"),
])
def test_impossible_shapes_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    vision.VisionConfig(**{"image_height": 32, "image_width": 64, "out_dim": 16, **fields}).check()


def _vision_lm(position="rope"):
  from tpu_lm.model import transformer

  cfg = transformer.ModelConfig(
      vocab_size=128, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16,
      norm="rmsnorm", position=position, mlp="swiglu", use_bias=False, attention_mask="prefix",
      vision=vision.VisionConfig(image_height=16, image_width=16, out_dim=32, patch=8, d_model=16, num_heads=2,
                                 mlp_dim=32))
  model = transformer.Transformer(cfg)
  b, t = 2, 12
  tokens = jax.random.randint(jax.random.key(2), (b, t), 3, 128).at[:, :4].set(0)  # 4 image slots, then text
  segments, positions = jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t))
  prefix = jnp.arange(t)[None].repeat(b, 0) < 7  # the image and a 3-token prompt; the answer after
  images = jax.random.uniform(jax.random.key(3), (b, 16, 16, 1), minval=-1, maxval=1)
  init = jax.jit(lambda key: model.init(key, tokens, segments, positions, prefix_BxT=prefix, images=images))
  params = meta.unbox(init(jax.random.key(4))["params"])
  return cfg, model, params, (tokens, segments, positions, prefix, images)


@pytest.mark.slow  # three compiles (the fast set sees the mask test below)
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_decoding_after_an_image_prefix_equals_the_full_forward_pass(position):
  from tpu_lm.model import transformer

  cfg, model, params, (tokens, segments, positions, prefix, images) = _vision_lm(position)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, tokens, segments, positions, prefix_BxT=prefix, images=images)
  cache = transformer.init_cache(cfg, 2, 12)
  first, cache = apply({"params": params}, tokens[:, :7], segments[:, :7], positions[:, :7], cache,
                       prefix_BxT=prefix[:, :7], images=images)
  np.testing.assert_allclose(first, full[:, :7], atol=1e-5)
  for i in range(7, 12):  # the answer, a token at a time, images not passed again
    step, cache = apply({"params": params}, tokens[:, i:i + 1], segments[:, i:i + 1], positions[:, i:i + 1], cache)
    np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


def test_the_image_and_prompt_attend_both_ways_the_answer_causally_and_text_rows_read_their_tokens():
  _, model, params, (tokens, segments, positions, prefix, images) = _vision_lm()
  apply = jax.jit(lambda tokens, images, rows=None: model.apply(
      {"params": params}, tokens, segments, positions, prefix_BxT=prefix, images=images, image_rows_B=rows))
  base = apply(tokens, images)
  changed = apply(tokens, images.at[0, 8:, 8:].set(1.0)) - base  # the image's last patch
  assert jnp.abs(changed[0, 0]).max() > 1e-5 and jnp.abs(changed[1]).max() == 0  # its first patch sees it
  changed = apply(tokens.at[0, 6].set(5), images) - base  # the prompt's last token
  assert jnp.abs(changed[0, :6]).max() > 1e-5  # the image and earlier prompt see it: one prefix
  changed = apply(tokens.at[0, 9].set(5), images) - base  # an answer token
  assert jnp.abs(changed[0, :9]).max() == 0 and jnp.abs(changed[0, 9:]).max() > 1e-5  # only what follows sees it
  # A mixed batch: row 1 without its image reads its own tokens there, as a text-only run would.
  mixed = apply(tokens, images, jnp.array([True, False]))
  np.testing.assert_array_equal(mixed[0], base[0])
  text = model.apply({"params": params}, tokens, segments, positions, prefix_BxT=prefix)
  np.testing.assert_allclose(mixed[1], text[1], atol=1e-6)


@pytest.mark.slow  # the KV-cache decoder's compile and a full forward pass
def test_the_decoder_reads_an_image_row_and_a_text_row_as_the_full_forward_pass_does():
  """Decoder.generate (the path of generate --image, the server and training's eval): an
  image row (4 slots, BOS, a 2-token prompt read both ways with it) and a text-only row
  (read left to right, BOS alone its prefix) in one batch; each greedy token is the full
  forward pass's argmax over the image, the prompt and the tokens before it."""
  from tpu_lm.inference import decode

  cfg, model, params, _ = _vision_lm()
  decoder = decode.Decoder(cfg, params, eos_id=1, pad_id=0, vocab_size=128)
  image = np.asarray(jax.random.randint(jax.random.key(5), (16, 16, 1), 0, 256), np.uint8)
  prompts = [[0, 0, 0, 0, 2, 40, 41], [2, 50, 51, 52]]
  out = decoder.generate(prompts, decode.Sampling(max_new_tokens=6, temperature=0.0), images=[image, None])
  for row, (prompt, completion) in enumerate(zip(prompts, out)):
    tokens = jnp.asarray([prompt + completion.tokens])
    t = tokens.shape[1]
    positions = jnp.arange(t)[None]
    reads_image = row == 0
    logits = model.apply({"params": params}, tokens, jnp.ones_like(tokens), positions,
                         prefix_BxT=positions < (len(prompt) if reads_image else 1),
                         images=vision.pixels_to_unit(jnp.asarray(image)[None]),
                         image_rows_B=jnp.asarray([reads_image]))
    expected = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1))
    assert completion.tokens and list(expected) == completion.tokens, row
    # The prefill's logits themselves (this tiny model's argmax mostly repeats its input).
    tokens_1xP = jnp.asarray([prompt])
    _, first = decode.prefill(decoder.model, decoder.params, tokens_1xP, jnp.asarray([len(prompt)]), 16,
                              jnp.asarray(image)[None], jnp.asarray([reads_image]))
    np.testing.assert_allclose(first[0], logits[0, len(prompt) - 1], atol=1e-5, err_msg=f"row {row}")
