"""Peak memory of `python -m tpu_lm.generate` against the parameter bytes it holds.

Writes a run directory of GPT-2 124M's shape (random weights, byte tokenizer, so
86M parameters; the layout training writes: the train state with AdamW's two
moments, the data position, the config and the tokenizer). Then, each in a fresh
CPU process, measures the peak resident memory (wait4's ru_maxrss) of:

- the JAX runtime alone (import tpu_lm's inference modules, one tiny jit);
- `python -m tpu_lm.generate` on the run (parameters only, read in the compute dtype);
- restoring the whole train state as training does (what generate did before it
  read parameters only), for comparison.

  python experiments/inference_memory/run.py     # ~2 minutes on a 2-core CPU

Prints a table and puts it on top of results.md next to this file (newest first). The measuring process
imports nothing heavy and writes the run directory in a child of its own: Linux
carries a parent's resident-memory high-water mark into its children's
`ru_maxrss`, even across exec.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.inference_memory.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.inference_memory.run", *sys.argv[1:]])

import json
import os
import subprocess
import sys
import tempfile

from experiments import plots, record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["JAX_PLATFORMS"] = "cpu"
HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2**20

_RUNTIME = """
import jax.numpy as jnp
from tpu_lm.inference import run_dir
jnp.ones(3).block_until_ready()
"""

_FULL_STATE = """
import json, sys, jax, ml_collections
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import checkpoint
from tpu_lm.training.setup import Setup
config = ml_collections.ConfigDict(json.load(open(sys.argv[1] + "/config.json")))
setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
class Position:
  def set_state(self, state): pass
ckpt = checkpoint.Checkpointer(sys.argv[1] + "/checkpoints", keep=1)
state = ckpt.restore(0, checkpoint.abstract_like(setup.abstract_state, setup.state_shardings), Position())
jax.block_until_ready(state)
"""


class _Start:
  """The data position of a run that has not started (what `Checkpointer.save` records)."""

  def get_state(self):
    return {"next_index": 0}


def write_run(workdir: str) -> None:
  """A run directory as training writes it (run in a child process, see above);
  prints {"params": N, "jax": version}."""
  from tpu_lm.parallel import libtpu_env

  libtpu_env.quiet_where_no_tpu()
  import jax

  from configs import gpt2_124m
  from tpu_lm.data import tokenizer as tokenizer_lib
  from tpu_lm.model import params as params_lib
  from tpu_lm.parallel import mesh as mesh_lib
  from tpu_lm.training import checkpoint
  from tpu_lm.training.setup import Setup

  config = gpt2_124m.get_config()
  config.data.tokenizer = "bytes"
  config.model.logits_chunk = 0
  config.optim.grad_accum_steps = 1
  config.data.global_batch_size = 1
  config.mesh.preset = ""
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  with setup.context():
    state = setup.init(jax.random.key(0))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  ckpt.save(0, state, _Start(), config.to_dict())
  ckpt.close()
  tokenizer_lib.save_for_run(tokenizer_lib.ByteTokenizer(), workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:  # for the full-state restore below
    json.dump(config.to_dict(), f)
  print(json.dumps({"params": params_lib.num_params(state.params), "jax": jax.__version__}))


def peak_rss(cmd: list[str]) -> int:
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  if status:
    raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
  return usage.ru_maxrss * 1024  # kilobytes on Linux


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
  with tempfile.TemporaryDirectory() as workdir:
    written = subprocess.run([sys.executable, "-m", "experiments.inference_memory.run", "--write", workdir], cwd=ROOT,
                             check=True, capture_output=True, text=True)
    info = json.loads(written.stdout.strip().splitlines()[-1])
    n, param_bytes = info["params"], 4 * info["params"]
    state_dir = os.path.join(workdir, "checkpoints", "0", "state")
    on_disk = du(state_dir)
    runtime = peak_rss([sys.executable, "-c", _RUNTIME])
    generate = peak_rss([sys.executable, "-m", "tpu_lm.generate", f"--workdir={workdir}", "--prompt=def f(x):",
                         "--max_new_tokens=8", "--temperature=0"])
    full = peak_rss([sys.executable, "-c", _FULL_STATE, workdir])
  rows = [
      ("parameters", f"{n:,} (float32 on disk: {param_bytes / MIB:,.0f} MiB; bfloat16 compute: {param_bytes / 2 / MIB:,.0f} MiB)"),
      ("train state on disk (params + AdamW moments)", f"{on_disk / MIB:,.0f} MiB"),
      ("JAX runtime alone, peak RSS", f"{runtime / MIB:,.0f} MiB"),
      ("`python -m tpu_lm.generate` (8 tokens), peak RSS", f"{generate / MIB:,.0f} MiB = runtime + {(generate - runtime) / MIB:,.0f} MiB"),
      ("restoring the whole train state instead, peak RSS", f"{full / MIB:,.0f} MiB = runtime + {(full - runtime) / MIB:,.0f} MiB"),
  ]
  record.publish(os.path.join(HERE, "results.md"), "Peak memory of generate against the parameters it holds",
                 ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows], record.speed_factor(),
                 about=f"jax {info['jax']}, GPT-2 124M shape, byte tokenizer")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--write"]:
    write_run(sys.argv[2])
  else:
    main()
    plots.inference_memory()  # the picture next to the table, from the entry just written
