"""The Hugging Face transformers peer of the speed tables: PyTorch eager on CPU (a thread per core,
float32) or CUDA, random weights and tokens: the mean time of the steps after a warm-up (train), or
the difference of a long and a short greedy generation (decode), the clock read after a device sync.

Runs in its own environment (PyTorch is not a dependency of tpu_lm; the test extra's
venv has it):
  python experiments/hf_peer.py train [--shape small|124m] [--train_batch B] [--bf16] [--compile]
      small: GPT-2 block 2 x 160, 4 heads, vocab 2048, batch 8 x 256; 124m: GPT-2 124M, batch 1 x 1024;
      AdamW + clipping; --bf16: bfloat16 autocast; --compile: torch.compile (on CUDA: fused AdamW,
      at least 5 warm-up and 20 timed steps)
  python experiments/hf_peer.py decode B       GPT-2 124M random weights, prompt 32, greedy
decode tok/s = B * (N_long - N_short) / (t(N_long) - t(N_short)), so prefill cancels.
Prints one JSON line. The benchmarks (experiments/decode/run.py, ...) call it with --peer_python.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.hf_peer`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.hf_peer", *sys.argv[1:]])

import argparse
import json
import os
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel


SHAPES = {  # name: (GPT-2 config fields, batch, length, warm-up steps, timed steps)
    "small": (dict(vocab_size=2048, n_positions=256, n_embd=160, n_layer=2, n_head=4), 8, 256, 5, 40),
    "124m": (dict(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12), 1, 1024, 2, 3),
}


def train(device: str, shape: str = "small", batch: int = 0, bf16: bool = False, compile_: bool = False) -> dict:
  """`batch` > 0 replaces the shape's; `bf16`: bfloat16 autocast (fp32 master weights, as
  tpu_lm's bf16 compute); `compile_`: torch.compile the model (nanoGPT's fast path)."""
  fields, b, t, warm, timed = SHAPES[shape]
  b = batch or b
  if device == "cuda":
    warm, timed = max(warm, 5), max(timed, 20)
  m = GPT2LMHeadModel(GPT2Config(**fields, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).to(device)
  opt = torch.optim.AdamW(m.parameters(), lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=device == "cuda")
  x = torch.randint(3, fields["vocab_size"], (b, t), device=device)
  forward = torch.compile(m) if compile_ else m

  def step():
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
      loss = forward(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(warm):
    step()
  _sync(device)
  t0 = time.perf_counter()
  for _ in range(timed):
    step()
  _sync(device)
  dt = (time.perf_counter() - t0) / timed
  how = ("compiled" if compile_ else "eager") + (", bf16 autocast" if bf16 else "")
  return {"peer": f"transformers {transformers.__version__} GPT-2 {how}", "shape": shape, "batch": b,
          "ms_per_step": round(1e3 * dt, 1), "tok_per_s": round(b * t / dt)}


def decode(batch: int, device: str, prompt: int, short: int, long: int) -> dict:
  m = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12)).eval()
  m = m.to(device)
  x = torch.randint(3, 50304, (batch, prompt), device=device)

  def gen(n):
    with torch.inference_mode():
      _sync(device)
      t0 = time.perf_counter()
      m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                 pad_token_id=0)
      _sync(device)
      return time.perf_counter() - t0

  gen(short), gen(long)
  ts = [(gen(short), gen(long)) for _ in range(3)]
  dt = (min(t[1] for t in ts) - min(t[0] for t in ts)) / (long - short)
  return {"peer": f"transformers {transformers.__version__} generate", "batch": batch, "decode_tok_s": round(batch / dt, 1)}


def _sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("what", choices=["train", "decode"])
  p.add_argument("batch", nargs="?", type=int, default=1)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--tokens", nargs=2, type=int, default=(8, 24))
  p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="train: which model and batch")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--train_batch", type=int, default=0, help="train: rows per step instead of the shape's")
  p.add_argument("--bf16", action="store_true", help="train: bfloat16 autocast")
  p.add_argument("--compile", action="store_true", help="train: torch.compile the model")
  args = p.parse_args()
  torch.manual_seed(0)
  if args.device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)  # as many as XLA uses (2 on the reference machine)
  if args.what == "train":
    result = train(args.device, args.shape, args.train_batch, args.bf16, args.compile)
  else:
    result = decode(args.batch, args.device, args.prompt, *args.tokens)
  print(json.dumps({**result, "device": args.device}))


if __name__ == "__main__":
  main()
