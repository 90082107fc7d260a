"""GGUF export (python -m tpu_lm.convert --to_gguf) against llama.cpp: does llama.cpp,
reading the exported file, tokenize our prompts to our ids and continue them greedily
with our tokens? Per GGUF type (f32, f16, q8_0), on a few code prompts.

Trains configs/base.py for --steps steps (or reuses --workdir, a Llama-shape run),
takes tpu_lm's greedy continuation of each prompt (`decoder.generate`, temperature 0),
exports the run in each type, and compares:
  tpu_lm on the file's weights   tpu_lm's greedy tokens with the file's (dequantized)
                                 weights: what the type alone changes
  llama.cpp ids                  llama-cpp-python's tokenize(text, add_bos=True) == ours
  llama.cpp greedy               argmax of llama.cpp's logits, token by token, == ours
The llama.cpp columns need llama-cpp-python (pip install llama-cpp-python: it builds
llama.cpp, many minutes; not a dependency of tpu_lm). Without it the script says so in
one line and fills in the rest. Puts its table on top of results.md.

usage: python -m experiments.gguf.run [--workdir RUN] [--steps 600] [--new_tokens 32]
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.gguf.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.gguf.run", *sys.argv[1:]])

import argparse
import os
import subprocess
import sys
import tempfile
import time

from experiments import record
from tpu_lm.parallel import libtpu_env

libtpu_env.quiet_where_no_tpu()
import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADER = "GGUF export against llama.cpp: the same prompt ids and greedy tokens per type (experiments/gguf)"
PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n\n", "class Stack:\n    def __init__(self):\n",
           "    for i in range(len(items)):\n", "# Licensed to the Python Software Foundation\n"]
TYPES = ("f32", "f16", "q8_0")


def train(steps: int, workdir: str) -> None:
  cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={workdir}",
         f"--config.num_train_steps={steps}", f"--config.eval_every_steps={steps}",
         f"--config.checkpoint_every_steps={steps}", "--config.sample.num_prompts=0"]
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def file_params(path: str, m, vocab_padded: int) -> dict:
  """tpu_lm parameters from a GGUF file: dequantized, un-permuted, renamed back."""
  import gguf

  from tpu_lm.interop import gguf_export, llama

  back = {f"{v}.weight": f"{k}.weight" for k, v in gguf_export.TOP_NAMES.items()}
  tensors = {}
  for t in gguf.GGUFReader(path).tensors:
    x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
    if t.name == "rope_freqs.weight":
      continue
    if t.name in back:
      tensors[back[t.name]] = x
      continue
    _, i, kind, _ = t.name.split(".")
    sub = {v: k for k, v in gguf_export.LAYER_NAMES.items()}[kind]
    heads = {"attn_q": m.num_heads, "attn_k": m.num_kv_heads}.get(kind)
    if heads:  # undo permute_rope
      rows, d_in = x.shape
      x = x.reshape(heads, rows // heads // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)
    tensors[f"model.layers.{i}.{sub}.weight"] = x
  return llama.to_params(tensors, {"num_layers": m.num_layers, "tie_embeddings": m.tie_embeddings}, vocab_padded)


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
  """Argmax of llama.cpp's logits, token by token (no sampler in between), to end-of-sequence."""
  llm.reset()
  llm.eval(prompt)
  out = []
  for _ in range(new_tokens):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    if token == eos:
      break
    out.append(token)
    llm.eval([token])
  return out


def agreed(a: list[int], b: list[int]) -> int:
  """How many leading tokens two continuations share."""
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--workdir", default="", help="reuse this Llama-shape run instead of training one")
  p.add_argument("--new_tokens", type=int, default=32)
  args = p.parse_args()
  try:
    import llama_cpp
  except ImportError:
    llama_cpp = None
    print("llama-cpp-python is not installed (pip install llama-cpp-python): the llama.cpp columns are not"
          " measured.", flush=True)
  from tpu_lm.inference import decode, run_dir
  from tpu_lm.inference.sampling import Sampling
  from tpu_lm.interop import gguf_export

  factor = record.speed_factor()
  tmp = tempfile.mkdtemp(prefix="gguf_experiment_")
  workdir = args.workdir or os.path.join(tmp, "run")
  if not args.workdir:
    train(args.steps, workdir)
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  tok, cfg = run.tokenizer, run.decoder.cfg
  prompts = [run.encode_prompt(text) for text in PROMPTS]
  greedy = Sampling(args.new_tokens, 0.0, 0, 1.0, 0)
  ours = [c.tokens for c in run.decoder.generate(prompts, greedy)]
  rows = []
  for kind in TYPES:
    path = os.path.join(tmp, f"model-{kind}.gguf")
    t0 = time.perf_counter()
    gguf_export.export(workdir, path, kind)
    seconds = time.perf_counter() - t0
    decoder = decode.Decoder(cfg, file_params(path, cfg, cfg.vocab_size), eos_id=tok.eos_id, pad_id=tok.pad_id,
                             vocab_size=tok.vocab_size)
    on_file = [c.tokens for c in decoder.generate(prompts, greedy)]
    same_ids = same_greedy = "not measured"
    if llama_cpp:
      llm = llama_cpp.Llama(model_path=path, n_ctx=cfg.max_len, logits_all=True, verbose=False)
      theirs_ids = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in PROMPTS]
      same_ids = f"{sum(a == b for a, b in zip(theirs_ids, prompts))}/{len(PROMPTS)}"
      theirs = [llama_cpp_greedy(llm, ids, args.new_tokens, tok.eos_id) for ids in prompts]
      same_greedy = (f"{sum(a == b for a, b in zip(theirs, ours))}/{len(PROMPTS)}"
                     f" (tokens agreed: {sum(agreed(a, b) for a, b in zip(theirs, ours))}/{sum(map(len, ours))})")
      del llm
    rows.append(f"| {kind} | {os.path.getsize(path) / 2**20:.2f} | {seconds:.1f} |"
                f" {sum(a == b for a, b in zip(on_file, ours))}/{len(PROMPTS)} | {same_ids} | {same_greedy} |")
  version = getattr(llama_cpp, "__version__", "?") if llama_cpp else "not installed"
  lines = [f"A Llama-shape run ({sum(x.size for x in jax.tree.leaves(run.decoder.params)):,} parameters,"
           f" {'trained ' + str(args.steps) + ' steps of configs/base.py' if not args.workdir else workdir},"
           f" step {run.step}, tokenizer {tok.name}); {len(PROMPTS)} code prompts, {args.new_tokens} greedy tokens"
           f" each; llama-cpp-python {version}.", "",
           "| type | file MiB | export s | tpu_lm on the file's weights: same greedy | llama.cpp: same prompt ids |"
           " llama.cpp: same greedy |",
           "|---|---:|---:|---:|---:|---|", *rows, "",
           "Same greedy: prompts whose whole continuation equals tpu_lm's own (its float32 weights, as trained).",
           ]
  record.publish(os.path.join(HERE, "results.md"), HEADER, lines, factor,
                 about="" if llama_cpp else "llama-cpp-python not installed: tpu_lm's side only")


if __name__ == "__main__":
  main()
