"""GPT-2 family: the base config's corpus, tokenizer, length and optimizer with the GPT-2
block (learned positions, LayerNorm, GELU MLP, biases, tied embeddings).

Command:
  python -m tpu_lm.main --config=configs/gpt2_small.py

Measured 2026-11-24 on a 2-core CPU with speed factor 0.59 (../shared/tools/cpu_speed.py),
cold start (dataset and tokenizer built first):
  wall time 409 s (= 241 s on the 2-core reference CPU)
  final eval on the whole validation split (1,803,563 bytes):
    bits/byte 1.6476, loss 3.2091 nats/token, perplexity 24.76 (zlib -9: 1.7053)

987,200 parameters (2 layers, width 160, 2 heads, MLP 640). This was the base config
until the Llama block beat it at the same cost (see configs/base.py).
"""

from configs import base


def get_config():
  c = base.get_config()
  base.gpt2_block(c.model)
  return c
