"""Does the data path stay flat as the corpus grows, and does it keep up with the steps?

1. Corpus growth. `text_files` corpora of 1x, 4x and 16x the Python standard library
   (copies under different names, so each is a distinct corpus of that size; symlinks,
   so the disk holds one), each trained for `--steps` steps of the base config with a
   fresh data_dir, eval bounded to 20 batches: peak RSS (wait4), wall time and time to
   the first training step (from the process start to its first logged step). With
   --baseline=DIR (a checkout of tpu_lm before streaming, e.g. `git worktree add DIR
   ca2f30f`) the same commands run on that code too, side by side.
2. The input pipeline. The base config's steady training rate (the main command,
   data read and tokenized on the fly, logged tokens/s after the first window)
   against the step-only rate (the same compiled train step on one fixed batch, in
   process), same machine, same run.

  python experiments/data_scale/run.py [--sizes 1 4 16] [--baseline DIR]   # ~10 min on 2 cores

Prints the tables and adds them to results.md next to this file (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.data_scale.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.data_scale.run", *sys.argv[1:]])

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import plots, record  # noqa: E402
MIB = 2**20


def corpus(directory: pathlib.Path, copies: int) -> tuple[str, int]:
  """`copies` copies of the stdlib's .py files (symlinks), and their total bytes."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
  size = 0
  for k in range(copies):
    for p in files:
      dst = directory / f"copy{k}" / p.relative_to(root)
      dst.parent.mkdir(parents=True, exist_ok=True)
      if not dst.exists():
        dst.symlink_to(p)
      size += p.stat().st_size
  return str(directory), size


def timed_run(cmd, env, cwd) -> dict:
  """Runs the command; peak RSS (its own, ru_maxrss of wait4), wall time, and the
  seconds until its first 'step' line."""
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first_step, lines = None, []
  for line in proc.stdout:
    lines.append(line)
    if first_step is None and line.lstrip().startswith("step "):
      first_step = time.time() - t0
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.time() - t0
  if status:
    raise SystemExit(f"{cmd[:6]} failed:\n{proc.stderr.read()[-3000:]}")
  return {"rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "first_step_s": first_step, "log": "".join(lines)}


def growth(sizes, work: pathlib.Path, code: str, steps: int) -> list[dict]:
  rows = []
  for n in sizes:
    path, size = corpus(work / f"stdlib_x{n}", n)
    data_dir = work / f"tfds_{os.path.basename(code)}_x{n}"
    shutil.rmtree(data_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={work / 'wd'}",
           "--config.data.dataset=text_files", f"--config.data.path={path}", f"--config.data.data_dir={data_dir}",
           f"--config.num_train_steps={steps}", "--config.log_every_steps=1", f"--config.eval_every_steps={steps}",
           "--config.sample.num_prompts=0", "--config.optim.warmup_steps=1"]
    if code == ROOT:
      cmd.append("--config.eval_max_batches=20")
    shutil.rmtree(work / "wd", ignore_errors=True)
    r = timed_run(cmd, {**os.environ, "PYTHONPATH": code, "XLA_FLAGS": ""}, code)
    r.update(copies=n, corpus_mb=size / 1e6)
    print(f"  {'tpu_lm' if code == ROOT else code} x{n}: {size / 1e6:.0f} MB, peak RSS {r['rss_mib']:.0f} MiB,"
          f" first step {r['first_step_s']:.1f} s, wall {r['wall_s']:.0f} s", flush=True)
    rows.append(r)
  return rows


def pipeline_rate(work: pathlib.Path, steps: int) -> dict:
  """Steady logged rate of the real loop against the bare compiled step."""
  wd = work / "rate_wd"
  shutil.rmtree(wd, ignore_errors=True)
  window = steps // 4
  cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={wd}",
         f"--config.num_train_steps={steps}", f"--config.log_every_steps={window}",
         f"--config.eval_every_steps={steps}", "--config.eval_max_batches=1", "--config.sample.num_prompts=0"]
  subprocess.run(cmd, cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, check=True, capture_output=True)
  records = [json.loads(line) for line in open(wd / "metrics.jsonl") if '"tokens_per_s"' in line]
  loop_rate = sum(r["tokens_per_s"] for r in records[1:]) / len(records[1:])  # the first window compiles

  probe = f"""
import time, jax, numpy as np
from configs import base
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training.setup import Setup
c = base.get_config()
setup = Setup(c, mesh_lib.make_mesh(mesh_lib.mesh_sizes(c.mesh)))
rng = np.random.default_rng(0)
b, t = c.data.global_batch_size, c.data.seq_len
batch = {{"inputs": rng.integers(3, 2048, (b, t)).astype(np.int32), "targets": rng.integers(3, 2048, (b, t)).astype(np.int32),
         "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}}
with setup.context():
  state = setup.init(jax.random.key(0))
  db = setup.device_batch(batch)
  for _ in range(10):
    state, m = setup.train_step(state, db)
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range({steps}):
    state, m = setup.train_step(state, db)
  jax.block_until_ready(m)
print(b * t * {steps} / (time.time() - t0))
"""
  out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, check=True,
                       capture_output=True, text=True)
  step_rate = float(out.stdout.strip().splitlines()[-1])
  return {"loop_tokens_per_s": loop_rate, "step_only_tokens_per_s": step_rate}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rate_steps", type=int, default=400)
  p.add_argument("--baseline", default="", help="a checkout of tpu_lm before streaming, run side by side")
  p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tpu_lm_data_scale"))
  args = p.parse_args()
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  factor = record.speed_factor()
  print("corpus growth:", flush=True)
  ours = growth(args.sizes, work, ROOT, args.steps)
  theirs = growth(args.sizes, work, os.path.abspath(args.baseline), args.steps) if args.baseline else []
  print("input pipeline:", flush=True)
  rate = pipeline_rate(work, args.rate_steps)

  lines = ["| code | corpus | peak RSS | first training step | wall time |", "|---|---|---|---|---|"]
  for name, rows in (("streaming", ours), (f"before ({args.baseline})", theirs)):
    for r in rows:
      lines.append(f"| {name} | {r['copies']}x stdlib, {r['corpus_mb']:.0f} MB | {r['rss_mib']:,.0f} MiB |"
                   f" {r['first_step_s']:.1f} s | {r['wall_s']:.0f} s |")
  if len(ours) > 1:
    lines += ["", f"Streaming, largest against smallest corpus: peak RSS {ours[-1]['rss_mib'] / ours[0]['rss_mib']:.2f}x,"
              f" time to the first step {ours[-1]['first_step_s'] / ours[0]['first_step_s']:.2f}x."]
  lines += ["", "| input pipeline (base config, float32) | tokens/s |", "|---|---|",
            f"| the training loop, data read and tokenized on the fly (steady windows) | {rate['loop_tokens_per_s']:,.0f} |",
            f"| the same compiled step on one fixed batch | {rate['step_only_tokens_per_s']:,.0f} |",
            f"| ratio | {rate['loop_tokens_per_s'] / rate['step_only_tokens_per_s']:.3f} |"]
  record.publish(os.path.join(HERE, "results.md"), "Data at any scale: results", lines, factor,
                 about=f"base config on text_files, {args.steps} steps")


if __name__ == "__main__":
  main()
  plots.data_scale()  # the picture next to the table, from the entry just written
