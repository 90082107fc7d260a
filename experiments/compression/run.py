"""Every compression method on the base config, in one table: bits, size, validation
bits/byte and its change from the dense model, decode tokens/s on this machine.

Needs the base run and a teacher trained on the same data (4x the parameters):

  python -m tpu_lm.main --config=configs/base.py --workdir=workdirs/base
  python -m tpu_lm.main --config=configs/teacher.py --workdir=workdirs/teacher
  python experiments/compression/run.py --base=workdirs/base --teacher=workdirs/teacher

Then, each into experiments/compression/runs/ (a run already there is reused):
  post-training (python -m tpu_lm.compress): int8, int4 in groups of 32, int8 weights +
    int8 activations, 50% one-shot magnitude pruning, 2:4 one-shot;
  fine-tuning from the base (configs/finetune.py, 300 steps at a tenth of its learning
    rate): dense (the reference for the rows below), 50% gradual magnitude pruning
    (0 -> 50% over the first 200 steps, masks every 20), 2:4, int4 quantization-aware
    training (then written int4 by python -m tpu_lm.compress);
  distillation (configs/distill.py): the base model and schedule taught by the teacher,
    against the same model trained from scratch (the base run itself).
Decode: batch 1, a 32-token prompt, greedy; tokens/s from 192 - 32 new tokens (the
prefill cancels), the fastest of three runs each. Prints the table and puts it on top of results.md.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.compression.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.compression.run", *sys.argv[1:]])

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import plots, record  # noqa: E402
from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()


def run(*args) -> None:
  print("$", " ".join(args), flush=True)
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def final_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if '"eval_bpb"' in line]
  return evals[-1]


def decode_tokens_per_s(workdir: str) -> float:
  import jax

  from tpu_lm.inference import decode, run_dir

  r = run_dir.load(workdir, devices=jax.devices()[:1])
  prompt = [r.tokenizer.bos_id, *range(10, 41)]
  best = {}
  for n in (32, 192) * 4:  # the first of each compiles; the fastest of the rest counts
    start = time.perf_counter()
    [c] = r.decoder.generate([prompt], decode.Sampling(max_new_tokens=n, temperature=0.0))
    best[n] = min(best.get(n, float("inf")), time.perf_counter() - start)
    assert len(c.tokens) == n or c.finish_reason == "stop"
  return (192 - 32) / (best[192] - best[32])


def params_of(workdir: str) -> int:
  from tpu_lm.inference import run_dir

  step = run_dir.resolve_step(workdir)
  return sum(int(np.prod(s)) for s in run_dir.saved_param_shapes(workdir, step).values())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--base", required=True)
  ap.add_argument("--teacher", required=True)
  ap.add_argument("--runs", default=os.path.join(HERE, "runs"))
  args = ap.parse_args()
  base, teacher = (os.path.abspath(p) for p in (args.base, args.teacher))
  runs = os.path.abspath(args.runs)
  os.makedirs(runs, exist_ok=True)
  at = lambda name: os.path.join(runs, name)  # noqa: E731

  post = {"int8": ["--quant=int8"], "int4_g32": ["--quant=int4", "--tile_size=32"],
          "w8a8": ["--quant=int8", "--act_int8"], "magnitude50_oneshot": ["--sparsity=0.5"],
          "two_four_oneshot": ["--n_m=2:4"]}
  for name, flags in post.items():
    if not os.path.exists(at(name)):
      run("-m", "tpu_lm.compress", f"--workdir={base}", f"--out={at(name)}", *flags)
  finetune = {"dense_ft": [], "gmp50_ft": ["--config.prune.sparsity=0.5", "--config.prune.end_step=200",
                                            "--config.prune.every=20"],
              "two_four_ft": ["--config.prune.n_m=2:4"],
              "qat_int4_ft": ["--config.quant.weight_qtype=int4", "--config.quant.tile_size=32",
                              "--config.quant.qat=True"]}
  for name, flags in finetune.items():
    if not os.path.exists(at(name)):
      run("-m", "tpu_lm.main", f"--config=configs/finetune.py:{base}", f"--workdir={at(name)}", *flags)
  if not os.path.exists(at("qat_int4")):
    run("-m", "tpu_lm.compress", f"--workdir={at('qat_int4_ft')}", f"--out={at('qat_int4')}", "--quant=int4",
        "--tile_size=32")
  if not os.path.exists(at("distilled")):
    run("-m", "tpu_lm.main", f"--config=configs/distill.py:{teacher}", f"--workdir={at('distilled')}")

  dense_bpb = final_eval(base)["eval_bpb"]
  ft_bpb = final_eval(at("dense_ft"))["eval_bpb"]
  n_base = params_of(base)
  rows = []

  def row(label, workdir, bpb, reference, bits=32.0, disk=None, note=""):
    disk = disk if disk is not None else params_of(workdir) * 4
    rows.append(f"| {label} | {bits:.2f} | {disk / 2**20:.2f} | {bpb:.4f} | {bpb - reference:+.4f} |"
                f" {decode_tokens_per_s(workdir):.0f} | {note} |")

  row("dense base (`configs/base.py`)", base, dense_bpb, dense_bpb, note=f"{n_base:,} parameters")
  for name, label in (("int8", "int8 weights, per channel"), ("int4_g32", "int4 weights, groups of 32"),
                      ("w8a8", "int8 weights + int8 activations"), ("magnitude50_oneshot", "50% magnitude, one shot"),
                      ("two_four_oneshot", "2:4, one shot")):
    with open(os.path.join(at(name), "compression.json")) as f:
      rep = json.load(f)
    row(label, at(name), rep["compressed"]["eval_bpb"], dense_bpb, rep["bits_per_weight"], rep["bytes_on_disk"][1],
        f"sparsity {rep['sparsity']['targets']:.0%} of block kernels" if rep["sparsity"]["targets"] else "")
  row("dense, fine-tuned 300 steps (reference for the rows below)", at("dense_ft"), ft_bpb, dense_bpb)
  for name, label in (("gmp50_ft", "50% gradual magnitude, fine-tuned"), ("two_four_ft", "2:4, fine-tuned")):
    row(label, at(name), final_eval(at(name))["eval_bpb"], ft_bpb, note="change against the dense fine-tune")
  with open(os.path.join(at("qat_int4"), "compression.json")) as f:
    rep = json.load(f)
  row("int4 groups of 32, quantization-aware fine-tune", at("qat_int4"), rep["compressed"]["eval_bpb"], ft_bpb,
      rep["bits_per_weight"], rep["bytes_on_disk"][1], "change against the dense fine-tune")
  t_bpb, d_bpb = final_eval(teacher)["eval_bpb"], final_eval(at("distilled"))["eval_bpb"]
  row("teacher (`configs/teacher.py`)", teacher, t_bpb, dense_bpb, note=f"{params_of(teacher):,} parameters")
  recovered = (dense_bpb - d_bpb) / (dense_bpb - t_bpb) if dense_bpb != t_bpb else float("nan")
  row("student distilled from the teacher", at("distilled"), d_bpb, dense_bpb,
      note=f"against the same model from scratch (the base); recovers {recovered:.0%} of the gap to the teacher")

  factor = record.speed_factor()
  record.publish(
      os.path.join(HERE, "results.md"), "Compression of the base config (experiments/compression)",
      ["| method | bits per parameter | weights on disk (MiB) | validation bits/byte | change | decode tokens/s"
       " (batch 1) | |", "|---|---|---|---|---|---|---|", *rows, "",
       "Float rows: float32 parameters (4 bytes each); quantized rows: the written checkpoint's size."], factor)

if __name__ == "__main__":
  main()
  plots.compression()  # the picture next to the table, from the entry just written
