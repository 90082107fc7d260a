"""Plots next to the experiments' tables, drawn from the results files they write.

  python experiments/plots.py              # every experiment below that has results
  python experiments/plots.py compression  # one

Each experiment's run.py calls its function here after writing its results, so the
picture is always the newest entry's; this script redraws them from the files alone.
(scaling/ and privacy/ draw their own; inspect/ and sweep/ keep the pictures their
commands draw.)
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.plots`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.plots", *sys.argv[1:]])

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def latest_table(path: str) -> list[dict]:
  """The first markdown table of the newest entry (the first one in the file)."""
  return _table(open(path).read())


def _table(text: str) -> list[dict]:
  """The first markdown table in `text`, as one dict a row."""
  rows, header = [], None
  for line in text.splitlines():
    line = line.strip()
    if not line.startswith("|"):
      if header is not None:
        break
      continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    if header is None:
      header = [c or f"column {i}" for i, c in enumerate(cells)]
    elif not set("".join(cells)) <= set("-: "):
      rows.append(dict(zip(header, cells)))
  return rows


def _num(text: str) -> float:
  m = re.search(r"-?[\d,]*\.?\d+", text.replace(",", ""))
  return float(m.group(0)) if m else float("nan")


def compression():
  rows = latest_table(os.path.join(HERE, "compression", "results.md"))
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  for r in rows:
    x, y = _num(r["weights on disk (MiB)"]), _num(r["validation bits/byte"])
    ax.plot(x, y, "o", color="C1" if "fine-tune" in r["method"] or "distilled" in r["method"] else "C0")
    ax.annotate(re.sub(r"\s*\(.*?\)", "", r["method"])[:34], (x, y), textcoords="offset points", xytext=(4, 3),
                fontsize=7)
  ax.set_xlabel("weights on disk (MiB)")
  ax.set_ylabel("validation bits/byte (lower is better)")
  ax.set_title("Compression of the base model: size against quality")
  ax.grid(alpha=0.3)
  return _save(fig, "compression", "compression.png")


def transfer():
  saved = json.load(open(os.path.join(HERE, "transfer", "results.json")))
  plt = _pyplot()
  lm = saved["lm"]
  fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
  names = [r["name"] for r in lm]
  ax.barh(names, [r["eval"]["eval_bpb"] for r in lm], color="C0")
  for i, r in enumerate(lm):
    ax.text(r["eval"]["eval_bpb"], i, f" {r['eval']['eval_bpb']:.3f}", va="center", fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("validation bits/byte on the target corpus (lower is better)")
  ax.set_title("Transfer: the same 300 steps from scratch and from the base model")
  ax.grid(axis="x", alpha=0.3)
  return _save(fig, "transfer", "transfer.png")


def serve_load():
  rows = latest_table(os.path.join(HERE, "serve_load", "results.md"))
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
  labels = [f"{r['server']}\n{r['phase']}" for r in rows]
  for ax, column, title in ((axes[0], "TTFT p50 / p99 ms", "time to first token"),
                            (axes[1], "ITL p50 / p99 ms", "inter-token latency")):
    p50 = [_num(r[column].split("/")[0]) for r in rows]
    p99 = [_num(r[column].split("/")[1]) for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("The server under load: this tree against the baseline of the latest entry")
  return _save(fig, "serve_load", "serve_load.png")


def data_scale():
  rows = latest_table(os.path.join(HERE, "data_scale", "results.md"))
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
  for code in sorted({r["code"] for r in rows}):
    pts = [r for r in rows if r["code"] == code]
    sizes = [_num(r["corpus"].split(",")[1]) for r in pts]
    axes[0].plot(sizes, [_num(r["peak RSS"]) for r in pts], "o-", label=code)
    axes[1].plot(sizes, [_num(r["first training step"]) for r in pts], "o-", label=code)
  import matplotlib.ticker

  for ax, label in ((axes[0], "peak RSS (MiB)"), (axes[1], "seconds to the first training step")):
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("corpus (MB)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle("Data at any scale: memory and start-up as the corpus grows")
  return _save(fig, "data_scale", "data_scale.png")


def decode():
  text = open(os.path.join(HERE, "decode", "results.md")).read()
  rows = []
  for entry in text.split("\n### "):  # the newest entry that measured the peer (the file is newest first)
    rows = _table(entry)
    if rows and "transformers tok/s" in rows[0] and any(r["transformers tok/s"] != "-" for r in rows):
      break
  else:
    return None
  return _against_transformers("decode", "decode.png", [f"{r['model']}\nbatch {r['batch']}" for r in rows],
                               [_num(r["decode tok/s"]) for r in rows], [_num(r["transformers tok/s"]) for r in rows],
                               "decode tokens/s", "Decode speed on this CPU", (6, 3.8), None)


def _against_transformers(experiment: str, name: str, labels: list[str], ours: list[float], theirs: list[float],
                          ylabel: str, title: str, size: tuple[float, float], label_size: int | None) -> str:
  """tpu_lm's bar beside transformers' for each row, on a log scale."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=size, constrained_layout=True)
  xs = range(len(labels))
  ax.bar([x - 0.2 for x in xs], ours, 0.4, label="tpu_lm")
  ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="transformers (PyTorch)")
  ax.set_xticks(list(xs), labels, fontsize=label_size)
  ax.set_yscale("log")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, experiment, name)


def _barh(experiment: str, name: str, labels: list[str], values: list[float], xlabel: str, title: str) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * len(labels)), constrained_layout=True)
  ax.barh(labels, values, color="C0")
  for i, v in enumerate(values):
    ax.text(v, i, f" {v:,.4g}", va="center", fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=10)
  ax.grid(axis="x", alpha=0.3)
  return _save(fig, experiment, name)


def base_tuning():
  rows = latest_table(os.path.join(HERE, "base_tuning", "results.md"))
  first, bpb = list(rows[0])[0], next(k for k in rows[0] if k.startswith("eval bits/byte"))
  labels = [re.sub(r"[*`]", "", r[first])[:48] for r in rows]
  return _barh("base_tuning", "base_tuning.png", labels, [_num(r[bpb].replace("*", "")) for r in rows],
               "validation bits/byte (lower is better)", "Base config candidates at the same token budget")


def inference_memory():
  rows = [r for r in latest_table(os.path.join(HERE, "inference_memory", "results.md")) if "peak RSS" in r["column 0"]]
  labels = [re.sub(r"[`]|, peak RSS", "", r["column 0"]) for r in rows]
  return _barh("inference_memory", "inference_memory.png", labels, [_num(r["column 1"]) for r in rows],
               "peak resident memory (MiB)", "Memory of generate against the JAX runtime and a full restore")


def throughput():
  rows = [r for r in latest_table(os.path.join(HERE, "throughput", "results.md")) if r["tokens/s"]]
  labels = [f"{r['model']} {r['batch x T']} remat {r['remat']}" + (f" {r['optimizer']}" if r.get("optimizer") else "")
            for r in rows]
  return _barh("throughput", "throughput.png", labels, [_num(r["tokens/s"]) for r in rows], "training tokens/s",
               "Training throughput of the real train step (newest entry)")


def train_step():
  rows = latest_table(os.path.join(HERE, "train_step", "results.md"))
  labels = [r["work"].replace("train step, ", "").split(", vocab")[0].split(", batch")[0] for r in rows]
  return _against_transformers("train_step", "train_step.png", labels, [_num(r["tpu_lm ms/step"]) for r in rows],
                               [_num(r["transformers ms/step"]) for r in rows], "ms per training step (lower is better)",
                               "One training step on this CPU, float32", (7, 3.8), 8)


def faults():
  rows = {r["check"]: r["result"] for r in latest_table(os.path.join(HERE, "faults", "results.md"))}
  ref, interrupted = (_num(x) for x in rows["wall time: reference / interrupted"].split("/"))
  passed = all(v.startswith("True") for k, v in rows.items() if k not in ("interruptions",) and "wall" not in k)
  return _barh("faults", "faults.png", ["uninterrupted", f"interrupted: {rows['interruptions']}"], [ref, interrupted],
               "wall time (s)", f"The same run, interrupted: bitwise equal? {'PASS' if passed else 'FAIL'}")


def _save(fig, experiment: str, name: str) -> str:
  path = os.path.join(HERE, experiment, name)
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")
  return path


ALL = {"compression": compression, "transfer": transfer, "serve_load": serve_load, "data_scale": data_scale,
       "decode": decode, "base_tuning": base_tuning, "inference_memory": inference_memory, "throughput": throughput,
       "train_step": train_step, "faults": faults}

if __name__ == "__main__":
  for name in sys.argv[1:] or ALL:
    ALL[name]()
