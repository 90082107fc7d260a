"""Decode speed against the memory-bandwidth bound, for GPT-2 124M and a ~1B Llama.

For each model and batch size: prefill a 128-token prompt (32 on a CPU), then decode with the KV
cache (tpu_lm.inference.decode.Decoder, one compiled while-loop). Decode tokens/s is measured
as the difference between a long and a short generation, so prefill and the loop's
fixed costs cancel:

  tokens/s = batch * (N_long - N_short) / (t_long - t_short)

The bound: each decode step must read every weight once and, per row, the KV cache
up to the current position, so

  bound tokens/s = batch * bandwidth / (weight bytes + batch * cache bytes per row)

with the cache at the mean context length of the timed steps. Bandwidth is the
chip's HBM bandwidth where known (H100, A100, TPU), else a measured streaming read
of a 1 GiB array through XLA on this machine. Parameters are random (speed does not
depend on their values) and cast to the compute dtype once, as serving does.

With --peer_python=PY (an interpreter with torch and transformers, e.g. the test extra's
venv) each gpt2_124m row is also measured with Hugging Face `generate` (greedy, random
weights, same batch, prompt and lengths; experiments/hf_peer.py), in the same run.

usage: python experiments/decode/run.py [--models gpt2_124m llama_1b] [--batches 1 32] [--peer_python PY]
Prints a table and puts it on top of results.md beside this script (newest first), row by row.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.decode.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.decode.run", *sys.argv[1:]])

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plots, record  # noqa: E402
from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()  # before JAX starts its backends
from tpu_lm.inference import decode  # noqa: E402

from tpu_lm.model import transformer as model_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADER = "Decode speed against the memory-bandwidth bound (experiments/decode)"

MODELS = {
    # GPT-2 small: 124M parameters, vocabulary padded to 50304.
    "gpt2_124m": model_lib.ModelConfig(
        vocab_size=50304, num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, head_dim=64,
        mlp_dim=3072, max_len=1024),
    # TinyLlama-1.1B's shape: 22 layers, width 2048, 32 heads sharing 4 KV heads.
    "llama_1b": model_lib.ModelConfig(
        vocab_size=32000, num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=64,
        mlp_dim=5632, max_len=2048, norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False,
        tie_embeddings=False),
}

# HBM bandwidth, bytes/s, by device kind (substring match, first hit wins).
BANDWIDTH = [("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12), ("v6", 1.64e12),
             ("v5p", 2.76e12), ("v5", 0.82e12), ("v4", 1.2e12)]



def bandwidth() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, bw in BANDWIDTH:
    if name.lower() in kind.lower():
      return bw, f"{kind} spec"
  x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
  read = jax.jit(lambda a: jnp.sum(a))
  read(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    read(x).block_until_ready()
  return 5 * x.nbytes / (time.perf_counter() - t0), f"{kind}, measured read"


def run(name: str, batch: int, dtype: str, prompt_len: int, n_short: int, n_long: int, bw: float) -> dict:
  cfg = dataclasses.replace(MODELS[name], dtype=dtype)
  model = model_lib.Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(lambda k: model.init(k, tokens, tokens + 1, jnp.arange(8)[None])["params"])(jax.random.key(0))
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  decoder = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=cfg.vocab_size)
  rng = np.random.default_rng(0)
  prompts = [[1, *rng.integers(3, cfg.vocab_size, prompt_len - 1)] for _ in range(batch)]

  def timed(n):
    decoder.generate(prompts, decode.Sampling(n, temperature=0))  # compile
    t0 = time.perf_counter()
    out = decoder.generate(prompts, decode.Sampling(n, temperature=0))
    assert all(len(c.tokens) == n for c in out)
    return time.perf_counter() - t0

  t_short, t_long = timed(n_short), timed(n_long)
  tok_s = batch * (n_long - n_short) / (t_long - t_short)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(decoder.params))
  weight_bytes -= cfg.vocab_size * cfg.d_model * jnp.dtype(dtype).itemsize  # embedding lookup reads one row
  mean_ctx = prompt_len + (n_short + n_long) / 2
  cache_bytes = 2 * cfg.num_layers * mean_ctx * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
  bound = batch * bw / (weight_bytes + batch * cache_bytes)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"model": name, "params": n_params, "batch": batch, "dtype": dtype, "tok_s": tok_s,
          "step_ms": 1000 * batch / tok_s, "bound": bound, "frac": tok_s / bound}


def peer(python: str, batch: int, prompt_len: int, n_short: int, n_long: int) -> float:
  """transformers' generate on GPT-2 124M, in its own interpreter: decode tokens/s."""
  out = subprocess.run([python, "-m", "experiments.hf_peer", "decode", str(batch), "--prompt", str(prompt_len),
                        "--tokens", str(n_short), str(n_long)], cwd=ROOT, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["decode_tok_s"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
  parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
  parser.add_argument("--tokens", nargs=2, type=int, default=None, help="short and long generation lengths")
  parser.add_argument("--prompt_len", type=int, default=None, help="prompt tokens (default 128; 32 on CPU)")
  parser.add_argument("--peer_python", default="", help="a Python with torch + transformers: measure HF generate too")
  args = parser.parse_args()
  on_cpu = jax.devices()[0].platform == "cpu"
  dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  # A CPU is ~1000x slower than an accelerator: shorter prompts and runs keep it to minutes.
  n_short, n_long = args.tokens or ((8, 24) if on_cpu else (16, 112))
  prompt_len = args.prompt_len or (32 if on_cpu else 128)
  bw, bw_source = bandwidth()
  device = jax.devices()[0]
  factor = record.speed_factor() + ("" if on_cpu else " (of the host CPU)")
  about = (f"jax {jax.__version__}; bandwidth {bw / 1e9:,.1f} GB/s ({bw_source}); prompt {prompt_len} tokens, timed"
           f" {n_short} vs {n_long} new tokens")
  on = record.machine() if on_cpu else f"{jax.device_count()} x {device.device_kind}"
  lines = ["| model | params | batch | dtype | decode tok/s | ms/step | bandwidth bound tok/s | % of bound"
           " | transformers tok/s | tpu_lm / transformers |", "|---|---|---|---|---|---|---|---|---|---|"]
  path = os.path.join(HERE, "results.md")
  print(record.title(factor, about, on) + "\n\n" + "\n".join(lines), flush=True)
  record.publish(path, HEADER, lines, factor, about, on, quiet=True)
  for name in args.models:
    for batch in args.batches:
      r = run(name, batch, dtype, prompt_len, n_short, n_long, bw)
      theirs = peer(args.peer_python, batch, prompt_len, n_short, n_long) if args.peer_python and name == "gpt2_124m" else 0
      versus = f" {theirs:,.1f} | {r['tok_s'] / theirs:.2f} |" if theirs else " - | - |"
      line = (f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r['batch']} | {r['dtype']} | {r['tok_s']:,.1f}"
              f" | {r['step_ms']:.1f} | {r['bound']:,.1f} | {100 * r['frac']:.0f}% |" + versus)
      print(line, flush=True)
      lines.append(line)  # the entry rewritten row by row: a slow run keeps what it measured
      record.publish(path, HEADER, lines, factor, about, on, replace_latest=True, quiet=True)


if __name__ == "__main__":
  main()
  plots.decode()  # the picture next to the table, from the entry just written
