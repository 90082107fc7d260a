"""The shape of a scaling law on a 2-core CPU: five model sizes on the standard-library
corpus, each trained on 20 tokens per non-embedding parameter (Hoffmann et al. 2022's
compute-optimal ratio), final validation bits/byte against parameters and compute, a
fitted power law with its residuals, and a plot.

usage (from the repository root; ~15-20 minutes on 2 cores, runs one after another):
  python experiments/scaling/run.py
  python experiments/scaling/run.py --only s1 s2     # some sizes (the fit needs three)
  python experiments/scaling/run.py --plot_only      # refit and replot results.json

Each size is `configs/base.py` (Llama block, SentencePiece 2048, batch 8 x 256) with
its width and depth overridden; the steps follow from the token budget, warmup is 5%
of them, and the learning rate is base's. N counts non-embedding parameters (Kaplan et
al. 2020 found those give the cleaner law; the 2048-row tables are most of a small
model's count) and compute is C = 6 N D. Writes results.md (table and fit, newest
first), results.json and scaling.png beside this file; the runs go to runs/ (ignored).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.scaling.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.scaling.run", *sys.argv[1:]])

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import record  # noqa: E402

TOKENS_PER_PARAM = 20
BATCH_TOKENS = 8 * 256
# name: (layers, width); 4 query heads sharing 2 KV heads, SwiGLU MLP ~2.6 x width
# (base's shape), roughly doubling the non-embedding parameters each size.
SIZES = {"s1": (1, 40), "s2": (1, 64), "s3": (2, 64), "s4": (2, 88), "s5": (2, 128)}

# Published exponents of loss against non-embedding parameters and against compute.
PUBLISHED = {
    "Kaplan et al. 2020, L(N) (data unlimited)": 0.076,
    "Kaplan et al. 2020, L(C_min) (compute-optimal)": 0.050,
    "Hoffmann et al. 2022, N term of L(N, D) = E + A/N^a + B/D^b": 0.34,
}


def mlp_dim(width: int) -> int:
  return 8 * round(2.6 * width / 8)


def non_embedding_params(layers: int, width: int) -> int:
  heads, kv_heads, head_dim = 4, 2, width // 4
  attn = width * heads * head_dim * 2 + width * kv_heads * head_dim * 2  # q, out; k, v
  mlp = 3 * width * mlp_dim(width)
  norms = 2 * width
  return layers * (attn + mlp + norms) + width  # + the final norm


def run(name: str) -> dict:
  layers, width = SIZES[name]
  n = non_embedding_params(layers, width)
  steps = max(50, round(TOKENS_PER_PARAM * n / BATCH_TOKENS))
  workdir = os.path.join(HERE, "runs", name)
  shutil.rmtree(workdir, ignore_errors=True)  # every size trains from scratch
  cmd = [sys.executable, "-m", "tpu_lm.main", "--config=configs/base.py", f"--workdir={workdir}",
         f"--config.model.num_layers={layers}", f"--config.model.d_model={width}",
         f"--config.model.mlp_dim={mlp_dim(width)}", "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
         f"--config.num_train_steps={steps}", f"--config.optim.warmup_steps={max(5, steps // 20)}",
         f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}",
         f"--config.log_every_steps={max(10, steps // 10)}", "--config.sample.num_prompts=0"]
  print(f"{name}: {layers} layer(s), width {width}, {n:,} non-embedding parameters, {steps} steps", flush=True)
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
  evals = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if "eval_bpb" in line]
  total = int(next(line for line in out.stdout.splitlines() if line.startswith("model: ")).split()[1].replace(",", ""))
  tokens = steps * BATCH_TOKENS
  row = {"size": name, "layers": layers, "width": width, "params": n, "params_total": total, "steps": steps,
         "tokens": tokens, "compute": 6.0 * n * tokens, "eval_bpb": evals[-1]["eval_bpb"],
         "eval_loss": evals[-1]["eval_loss"]}
  print(f"  -> {row['eval_bpb']:.4f} bits/byte", flush=True)
  return row


def fit(x, y) -> dict:
  """y = a x^-alpha by least squares in log-log space, with the residuals (log10 y)."""
  lx, ly = np.log10(x), np.log10(y)
  slope, intercept = np.polyfit(lx, ly, 1)
  residuals = ly - (slope * lx + intercept)
  return {"alpha": float(-slope), "a": float(10**intercept), "residuals_log10": residuals.tolist(),
          "rms_residual_log10": float(np.sqrt(np.mean(residuals**2)))}


def fit_with_floor(x, y) -> dict | None:
  """y = E + A x^-alpha (an irreducible loss E, as Hoffmann et al. fit), by nonlinear
  least squares; five points constrain three parameters poorly: reported, not trusted."""
  from scipy.optimize import curve_fit

  lx = np.log(np.asarray(x, float))
  try:
    (e, log_a, alpha), cov = curve_fit(lambda lx, e, log_a, alpha: e + np.exp(log_a - alpha * lx), lx, y,
                                       p0=(1.0, 2.0, 0.3), bounds=([0.0, -20.0, 0.0], [min(y), 50.0, 3.0]),
                                       maxfev=20000)
  except (RuntimeError, ValueError):
    return None
  err = np.sqrt(np.diag(cov))
  return {"E": float(e), "A": float(np.exp(log_a)), "alpha": float(alpha), "alpha_stderr": float(err[2]),
          "E_stderr": float(err[0])}


def plot(rows, fits, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  for ax, key, label, f in ((axes[0], "params", "non-embedding parameters N", fits["params"]),
                            (axes[1], "compute", "training compute C = 6ND (FLOPs)", fits["compute"])):
    x = np.array([r[key] for r in rows], float)
    y = np.array([r["eval_bpb"] for r in rows])
    grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 50)
    ax.loglog(x, y, "o", color="C0", label="measured (validation)")
    ax.loglog(grid, f["a"] * grid ** -f["alpha"], "-", color="C1",
              label=f"fit: {f['a']:.3g} x^-{f['alpha']:.3f}")
    for r, xi, yi in zip(rows, x, y):
      ax.annotate(r["size"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
    ax.set_xlabel(label)
    ax.set_ylabel("validation bits per byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"tpu_lm on the Python standard library, {TOKENS_PER_PARAM} tokens per parameter")
  fig.savefig(path, dpi=110)


def recipe() -> str:
  """How configs/base.py trains, as the entries name it (it took Muon, zero-init and WSD
  on 2026-12-04; the entries before say AdamW and cosine by their date)."""
  from configs import base

  c = base.get_config()
  return f"{c.optim.optimizer}, {c.optim.schedule} schedule" + (", zero-init projections" if c.model.zero_init_out else "")


def report(rows, factor: str, replace_latest: bool = False, trained_with: str = "") -> None:
  trained_with = trained_with or recipe()
  rows = sorted(rows, key=lambda r: r["params"])
  fits = {"params": fit([r["params"] for r in rows], [r["eval_bpb"] for r in rows]),
          "compute": fit([r["compute"] for r in rows], [r["eval_bpb"] for r in rows]),
          "params_with_floor": fit_with_floor([r["params"] for r in rows], [r["eval_bpb"] for r in rows])}
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"rows": rows, "fits": fits, "tokens_per_param": TOKENS_PER_PARAM, "factor": factor,
               "trained_with": trained_with}, f, indent=1)
  plot(rows, fits, os.path.join(HERE, "scaling.png"))
  lines = ["| size | layers x width | N (non-embedding) | N (all) | steps | tokens D | C = 6ND | eval bits/byte"
           " | residual (log10) |", "|---|---|---|---|---|---|---|---|---|"]
  for r, res in zip(rows, fits["params"]["residuals_log10"]):
    lines.append(f"| {r['size']} | {r['layers']} x {r['width']} | {r['params']:,} | {r['params_total']:,}"
                 f" | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['compute']:.2e} | {r['eval_bpb']:.4f} | {res:+.4f} |")
  p, c = fits["params"], fits["compute"]
  lines += ["", f"Fit L(N) = {p['a']:.3g} N^-{p['alpha']:.3f} (rms residual {p['rms_residual_log10']:.4f} in log10);"
            f" L(C) = {c['a']:.3g} C^-{c['alpha']:.3f} (rms {c['rms_residual_log10']:.4f})."]
  if fl := fits["params_with_floor"]:
    lines += [f"With an irreducible term: L(N) = {fl['E']:.3f} (+-{fl['E_stderr']:.2f}) + {fl['A']:.3g}"
              f" N^-{fl['alpha']:.3f} (+-{fl['alpha_stderr']:.3f}); five points pin three parameters loosely."]
  lines += [
            "Published: " + "; ".join(f"{k}: {v}" for k, v in PUBLISHED.items()) + ". Plot: scaling.png."]
  path = os.path.join(HERE, "results.md")
  record.publish(path, "Scaling: validation bits/byte against parameters and compute (run.py)", lines, factor,
                 about=f"{TOKENS_PER_PARAM} tokens/parameter, {trained_with}",
                 replace_latest=replace_latest)  # a refit replaces the entry of the runs it refits


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", nargs="*", default=list(SIZES))
  parser.add_argument("--plot_only", action="store_true")
  args = parser.parse_args()
  if args.plot_only:
    saved = json.load(open(os.path.join(HERE, "results.json")))
    report(saved["rows"], saved.get("factor", record.speed_factor()), replace_latest=True,
           trained_with=saved.get("trained_with", "adamw, cosine schedule"))
    return
  factor = record.speed_factor()
  rows = [run(name) for name in args.only]
  report(rows, factor)


if __name__ == "__main__":
  main()
