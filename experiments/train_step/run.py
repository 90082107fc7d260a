"""One training step on a CPU, tpu_lm against Hugging Face transformers, same machine, same run.

Two shapes, float32, AdamW + clipping at 1.0, random tokens: configs/gpt2_small.py with
the peer's 4 heads (GPT-2 block, 2 layers x 160, vocab 2048, batch 8 x 256; 5 warm-up
steps, mean of 40) and GPT-2 124M at batch 1 x 1024 (configs/gpt2_124m.py's model in
float32; 2 warm-up steps, mean of 3). tpu_lm's number is the whole compiled train step
(Setup.train_step: forward, backward, AdamW, the non-finite guard and metrics); the peer's is
PyTorch eager forward + backward + clip + AdamW (experiments/hf_peer.py train), run in
the interpreter given by --peer_python (any with torch and transformers; PyTorch is
not a dependency of tpu_lm).

  python experiments/train_step/run.py --peer_python=.venv/bin/python

Prints a table and adds it to results.md beside this script (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.train_step.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.train_step.run", *sys.argv[1:]])

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import gpt2_124m, gpt2_small  # noqa: E402
from experiments import plots, record  # noqa: E402
from tpu_lm.parallel import mesh as mesh_lib  # noqa: E402
from tpu_lm.training.setup import Setup  # noqa: E402


def _config(shape: str):
  if shape == "small":
    c = gpt2_small.get_config()
    c.model.num_heads = 4  # the peer's GPT-2 config
    return c, 5, 40
  c = gpt2_124m.get_config()
  c.data.global_batch_size, c.optim.grad_accum_steps = 1, 1
  c.model.dtype, c.model.scan_layers, c.model.logits_chunk = "float32", False, 0
  return c, 2, 3


def ours(shape: str) -> float:
  c, warm, steps = _config(shape)
  setup = Setup(c, mesh_lib.make_mesh(mesh_lib.mesh_sizes(c.mesh)))
  rng = np.random.default_rng(0)
  b, t = c.data.global_batch_size, c.data.seq_len
  tokens = rng.integers(3, c.data.vocab_size, (b, t)).astype(np.int32)
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "segment_ids": np.ones((b, t), np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
  with setup.context():
    state = setup.init(jax.random.key(0))
    db = setup.device_batch(batch)
    for _ in range(warm):
      state, m = setup.train_step(state, db)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = setup.train_step(state, db)
    jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps * 1e3


def peer(python: str, shape: str) -> dict:
  out = subprocess.run([python, "-m", "experiments.hf_peer", "train", "--shape", shape], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


ROWS = {"small": "GPT-2 block 2 x 160, 4 heads, vocab 2048, batch 8 x 256", "124m": "GPT-2 124M, batch 1 x 1024"}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--peer_python", required=True, help="a Python with torch + transformers")
  p.add_argument("--shapes", nargs="+", choices=sorted(ROWS), default=["small", "124m"])
  args = p.parse_args()
  factor = record.speed_factor()
  rows = []
  for shape in args.shapes:
    mine, theirs = ours(shape), peer(args.peer_python, shape)
    rows.append(f"| train step, {ROWS[shape]}, float32 | {mine:,.1f} | {theirs['ms_per_step']:,.1f} |"
                f" {theirs['ms_per_step'] / mine:.2f} |")
    print(rows[-1], flush=True)
  lines = ["| work | tpu_lm ms/step | transformers ms/step | transformers / tpu_lm (>= 1: tpu_lm faster) |",
           "|---|---|---|---|", *rows]
  record.publish(os.path.join(HERE, "results.md"), "Training step against the peers", lines, factor,
                 about=f"jax {jax.__version__}, {theirs['peer']}")


if __name__ == "__main__":
  main()
  plots.train_step()  # the picture next to the table, from the entry just written
