"""Training throughput and MFU of the real train step on whatever accelerator is here.

Models: GPT-2 124M (configs/gpt2_124m.py: T=1024, vocab 50304) and the Llama-style
~1B (configs/llama_1b.py: T=2048, vocab 32768), AdamW, bf16 compute, fp32 master
weights. Each case builds `tpu_lm.training.setup.Setup` from the config (the same jitted,
sharded, donated train step `python -m tpu_lm.main` runs) on all local devices,
feeds it fixed random token batches (one document per row; the input pipeline is
not what is measured), runs warm-up steps, then times `--steps` steps ending in a
device sync.

  tokens/s = batch * T * steps / seconds
  MFU      = (6N + 12·L·d·T) FLOPs/token * tokens/s / (devices * bf16 dense peak)

N excludes position embeddings (PaLM appendix B / nanoGPT). Peak memory is the
device allocator's peak where it reports one (GPU, TPU), else the process's max RSS.

The GPU XLA flags below (set before jax is imported, unless XLA_FLAGS is already
set) are the ones the table was measured with.

usage: python experiments/throughput/run.py [--cases gpt2_124m:32:none llama_1b:8:none ...]
       [--steps 20] [--warmup 3] [--attention auto]
A case is model:batch:remat[:accum[:optimizer]] (optimizer: optim.optimizer, adamw by
default; muon adds its Newton-Schulz iterations to each step). Prints a table and puts it on top of results.md (newest
first, row by row); every row also goes to results.jsonl beside this script.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.throughput.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.throughput.run", *sys.argv[1:]])

import argparse
import datetime
import json
import os
import resource
import sys
import time

# Overlap collectives and copies with compute (matters from 2 GPUs on; harmless on 1).
GPU_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "") != "cpu":
  os.environ["XLA_FLAGS"] = GPU_XLA_FLAGS

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import gpt2_124m, llama_1b  # noqa: E402
from experiments import plots, record  # noqa: E402
from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()  # before JAX starts its backends
from tpu_lm.parallel import mesh as mesh_lib  # noqa: E402

from tpu_lm.training import metrics  # noqa: E402
from tpu_lm.training.setup import Setup  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {"gpt2_124m": gpt2_124m.get_config, "llama_1b": llama_1b.get_config}
DEFAULT_CASES = {
    # Swept on a GPU: batch sizes around where memory runs out, remat off and on.
    "gpu": ["gpt2_124m:16:none", "gpt2_124m:32:none", "gpt2_124m:64:none", "gpt2_124m:64:dots_no_batch",
            "llama_1b:4:none", "llama_1b:8:none", "llama_1b:8:dots_no_batch", "llama_1b:16:dots_no_batch"],
    # A CPU can only show that the script works.
    "cpu": ["gpt2_124m:1:none"],
}


def config_for(model: str, batch: int, remat: str, accum: int, attention: str, optimizer: str = "adamw"):
  from tpu_lm.config import defaults

  if optimizer not in defaults.CHOICES["optim.optimizer"]:
    raise SystemExit(f"case optimizer {optimizer!r}: use one of {', '.join(defaults.CHOICES['optim.optimizer'])}")
  c = CONFIGS[model]()
  c.optim.optimizer = optimizer
  c.data.global_batch_size = batch
  c.optim.grad_accum_steps = accum
  c.model.remat = remat
  c.model.attention = attention
  c.mesh.preset = "data_parallel"
  c.data.tokenizer = "sentencepiece"
  return c


def measure(model: str, batch: int, remat: str, accum: int, *, steps: int, warmup: int, attention: str,
            optimizer: str = "adamw") -> dict:
  config = config_for(model, batch, remat, accum, attention, optimizer)
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes(config.mesh))
  setup = Setup(config, mesh)
  t = config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.data.vocab_size, (batch, t + 1)).astype(np.int32)
  host_batch = {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": np.ones((batch, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (batch, 1)),
  }
  row = {"model": model, "batch": batch, "seq_len": t, "remat": remat, "accum": accum, "optimizer": optimizer,
         "attention": setup.model_cfg.attention, "logits_chunk": config.model.logits_chunk}
  try:
    with setup.context():
      state = setup.init(jax.random.key(0))
      device_batch = setup.device_batch(host_batch)
      t0 = time.time()
      step = setup.train_step.lower(state, device_batch).compile()
      row["compile_s"] = round(time.time() - t0, 1)
      for _ in range(warmup):
        state, m = step(state, device_batch)
      jax.block_until_ready(m)
      t0 = time.time()
      for _ in range(steps):
        state, m = step(state, device_batch)
      jax.block_until_ready((state, m))
      seconds = time.time() - t0
  except Exception as e:  # an out-of-memory case is a result, not a crash
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    row["error"] = "out of memory"
    return row
  tokens_per_s = batch * t * steps / seconds
  peak = metrics.peak_flops_per_device(0.0) * jax.device_count()
  row.update({
      "step_ms": round(1e3 * seconds / steps, 1),
      "tokens_per_s": round(tokens_per_s),
      "mfu": round(setup.flops_per_step() / (seconds / steps) / peak, 4) if peak else None,
      "loss": round(float(m["loss"]), 3),
      "peak_memory_gib": round(_peak_memory() / 2**30, 2),
  })
  return row


def _peak_memory() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"]
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="*")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--attention", default="auto")
  args = p.parse_args()
  platform = jax.devices()[0].platform
  cases = args.cases or DEFAULT_CASES["cpu" if platform == "cpu" else "gpu"]
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  versions = f"jax {jax.__version__}"
  factor = record.speed_factor() + ("" if platform == "cpu" else " (of the host CPU)")
  on = record.machine() if platform == "cpu" else device
  about = f"{versions}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip() or 'none'}"
  header = ("| model | batch x T | remat | accum | optimizer | logits chunk | attention | step ms | tokens/s | MFU |"
            " peak mem GiB |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  path = os.path.join(HERE, "results.md")
  print(record.title(factor, about, on) + "\n\n" + "\n".join(lines), flush=True)
  record.publish(path, "Training throughput", lines, factor, about, on, quiet=True)
  for case in cases:
    model, batch, remat, *rest = case.split(":")
    accum, optimizer = int(rest[0]) if rest else 1, rest[1] if len(rest) > 1 else "adamw"
    row = measure(model, int(batch), remat, accum, steps=args.steps, warmup=args.warmup, attention=args.attention,
                  optimizer=optimizer)
    row.update(device=device, date=str(datetime.date.today()), versions=versions)
    if "error" in row:
      line = (f"| {model} | {batch} x {row['seq_len']} | {remat} | {row['accum']} | {optimizer} |"
              f" {row['logits_chunk']} | {row['attention']} | {row['error']} | | | |")
    else:
      mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
      line = (f"| {model} | {batch} x {row['seq_len']} | {remat} | {row['accum']} | {optimizer} |"
              f" {row['logits_chunk']} | {row['attention']} |"
              f" {row['step_ms']} | {row['tokens_per_s']:,} | {mfu} | {row['peak_memory_gib']} |")
    print(line, flush=True)
    lines.append(line)
    record.publish(path, "Training throughput", lines, factor, about, on, replace_latest=True, quiet=True)
    with open(os.path.join(HERE, "results.jsonl"), "a") as f:  # every row, for tools (oldest first)
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
  plots.throughput()  # the picture next to the table, from the entry just written
