"""Reading config: a vision-language model that reads lines of Python drawn as pictures
(optical character recognition, offline): configs/base.py's decoder and recipe, with a
small ViT whose patch embeddings lead each row (tasks/reading.py, model/vision.py).

Each example is one line of a standard-library file drawn on the fly into a 32 x 256
grayscale image (font 14-18 px, offset up to 4 px, noise 0.1; reading.*), then BOS and
the line's characters; the loss is on the text only, the image and BOS are read both
ways (a prefix LM), the text causally. Eval adds the character error rate and
exact-line accuracy of reading held-out lines greedily from their images alone.

Why full-height strips, bytes and twice the base's steps (docs/reading.md has the
numbers): a strip 8 pixels wide holds about one character, so the decoder finds the
next character a fixed distance back in rotary positions; a byte per character keeps
that alignment; 32 image positions (not 128 square patches) make a step half the base's
cost, so twice its steps fit in its time.

Command:
  python -m tpu_lm.main --config=configs/reading.py

Measured 2026-12-05 on a 2-core CPU (speed factor 0.58): 414 s for the whole command
(the base config's 449 s on the same machine); on the 96 held-out lines (one from each
validation file), character error rate 0.076 and 42.7% of the lines exact (seed 1: 0.093,
40.6%). experiments/multimodal/results.md has the steps, image sizes and pretrained
decoders against it.
"""

from configs import base

STEPS = 2 * base.STEPS  # a step costs half the base's: the same wall-clock


def get_config():
  c = base.get_config()
  c.task.kind = "reading"
  c.data.tokenizer = "bytes"  # a token per character: the strips and the text align
  c.vision.image_height, c.vision.image_width = 32, 256
  c.vision.patch, c.vision.patch_height = 8, 32  # 32 full-height strips, about a character each
  c.vision.d_model, c.vision.num_heads, c.vision.mlp_dim, c.vision.num_layers = 128, 4, 512, 2
  c.data.seq_len = c.model.max_len = 96  # 32 image positions, BOS, up to 63 characters
  c.num_train_steps = STEPS
  c.optim.warmup_steps = round(0.05 * STEPS)
  c.eval_every_steps = STEPS // 2
  c.sample.num_prompts = 0  # samples read images: the eval's transcriptions show them
  c.reading.eval_examples = 96  # the whole validation split (a line from each held-out file)
  return c
