"""Tiny config: a smoke test of the whole pipeline in about a minute on a laptop CPU.

Command:
  python -m tpu_lm.main --config=configs/tiny.py
On your own text files:
  python -m tpu_lm.main --config=configs/tiny.py --config.data.dataset=text_files --config.data.path='/data/*.txt'

A 2-layer, width-64 byte-level model trained for 100 steps; its loss falls but its
samples are noise. The tests run this config, shrunk further, end to end.
"""

from tpu_lm.config import defaults


def get_config():
  # From the defaults (AdamW, cosine), not configs/base.py's speedrun recipe: a smoke test
  # whose runs export to Hugging Face and GGUF, and that the tests rely on as it is.
  c = defaults.get_config()
  c.num_train_steps = 100
  c.log_every_steps = 20
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 50
  c.data.tokenizer = "bytes"
  c.data.seq_len = 64
  c.data.global_batch_size = 16
  c.model.num_layers = 2
  c.model.d_model = 64
  defaults.gpt2_block(c.model)
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.model.max_len = 128
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 10
  c.sample.num_prompts = 2
  c.sample.prompt_tokens = 16
  c.sample.new_tokens = 32
  return c
