"""Shared settings of the real-size configs (gpt2_124m, gpt2_1p5b, llama_1b, llama_8b,
llama_70b): accelerator precision, scanned layers, a large corpus. Not a config itself.

Check any of them against a TPU slice before paying for one (no TPU needed):
  python -m tpu_lm.main --config=configs/llama_8b.py --compile_for=v5p-64
"""

from configs import base


def config(*, family: str, layers: int, d_model: int, heads: int, kv_heads: int, mlp_dim: int,
           vocab: int, seq_len: int, batch: int, steps: int, lr: float):
  c = base.get_config()
  c.num_train_steps = steps
  c.log_every_steps = 10
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000
  # A catalog corpus (needs the network once to download and prepare it).
  # The whole split is tokenized into memory, so documents are capped.
  c.data.dataset = "c4/en"
  c.data.eval_split = "validation"
  c.data.max_documents = 2_000_000
  c.data.vocab_size = vocab
  c.data.seq_len = seq_len
  c.data.global_batch_size = batch
  m = c.model
  base.llama_block(m) if family == "llama" else base.gpt2_block(m)
  m.num_layers, m.d_model, m.num_heads, m.mlp_dim, m.max_len = layers, d_model, heads, mlp_dim, seq_len
  m.num_kv_heads = kv_heads if family == "llama" else 0
  m.rope_theta = 500_000.0
  m.dtype = "bfloat16"  # fp32 master weights, bf16 compute
  m.scan_layers = True  # compile time independent of depth
  m.attention = "auto"  # splash on TPU, cuDNN on GPU
  c.optim.learning_rate = lr
  c.optim.warmup_steps = min(2000, steps // 10)
  c.optim.weight_decay = 0.1
  c.sample.num_prompts = 2
  return c
