"""Reading config: a vision-language model that reads lines of Python drawn as pictures
(optical character recognition, offline): configs/base.py's decoder, data and recipe,
with a small ViT whose patch embeddings lead each row (tasks/reading.py, model/vision.py).

Each example is one line of a standard-library file drawn on the fly into a 32 x 256
grayscale image (font 14-18 px, offset up to 4 px, noise 0.1; reading.*), then BOS and
the line's tokens; the loss is on the text only, the image and BOS are read both ways
(a prefix LM), the text causally. Eval adds the character error rate and exact-line
accuracy of reading held-out lines greedily from their images alone.

Command:
  python -m tpu_lm.main --config=configs/reading.py
"""

from configs import base


def get_config():
  c = base.get_config()
  c.task.kind = "reading"
  c.vision.image_height, c.vision.image_width = 32, 256
  c.vision.patch = 8  # 4 x 32 = 128 patches
  c.vision.d_model, c.vision.num_heads, c.vision.mlp_dim = 128, 4, 512
  c.vision.num_layers = 2
  c.data.seq_len = c.model.max_len = 176  # 128 image positions, BOS, up to 47 text tokens
  c.sample.num_prompts = 0  # samples read images: the eval's transcriptions show them
  c.reading.eval_examples = 64
  return c
