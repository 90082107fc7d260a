"""Shared settings of the real-size configs (gpt2_124m, gpt2_1p5b, llama_1b, llama_8b,
llama_70b): accelerator precision, scanned layers, a large corpus. Not a config itself.

Check any of them against a TPU slice before paying for one (no TPU needed):
  python -m tpu_lm.main --config=configs/llama_8b.py --compile_for=v5p-64

Data: C4 (English) as TFDS prepares it, all of it: 365M training documents, about
160B tokens at these vocabularies (C4's own count is 156B T5 tokens), ~800 GB as
TFRecord. Prepare it once where every host can read it (TFDS builds C4 with Apache
Beam: `tfds build c4/en --data_dir=gs://BUCKET/tensorflow_datasets`), then pass
`--config.data.data_dir=gs://BUCKET/tensorflow_datasets` and a `--workdir=gs://...`
(several hosts must share the workdir; the run checks). Each host reads and tokenizes
only its own rows' documents; the first run indexes each TFRecord file's records
once (an `.tpu_lm_index.npy` beside it, or in memory where the bucket is read-only).
The SentencePiece vocabulary is trained on a fixed 32 MB sample, the same on every
host. Tokens read, against one epoch of C4:

  gpt2_124m  20k steps x 512 x 1024 = 10.5B tokens   7% of an epoch
  gpt2_1p5b  50k x 512 x 1024       = 26.2B          16%
  llama_1b   50k x 256 x 2048       = 26.2B          16%
  llama_8b   100k x 256 x 4096      = 105B           66%
  llama_70b  100k x 512 x 4096      = 210B           1.3 epochs
"""

from tpu_lm.config import defaults


def config(*, family: str, layers: int, d_model: int, heads: int, kv_heads: int, mlp_dim: int,
           vocab: int, seq_len: int, batch: int, steps: int, lr: float):
  # The defaults (AdamW, cosine), not configs/base.py's recipe: measured at 1M
  # parameters on a CPU only, and Muon's cost at these sizes is in docs/benchmarks.md.
  c = defaults.get_config()
  c.num_train_steps = steps
  c.log_every_steps = 10
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000
  # The whole catalog corpus, streamed (see above); eval reads whole documents up to
  # 100 batches of its validation split (364k documents in all).
  c.data.dataset = "c4/en"
  c.data.eval_split = "validation"
  c.eval_max_batches = 100
  c.data.vocab_size = vocab
  c.data.seq_len = seq_len
  c.data.global_batch_size = batch
  m = c.model
  defaults.llama_block(m) if family == "llama" else defaults.gpt2_block(m)
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
