"""A sweep's results: a table (results.md, results.csv) and plots (objective per trial,
objective against each parameter), written to the sweep directory."""

import csv
import math
import os

from tpu_lm.sweeps.study import state_of


def rows(study) -> list[dict]:
  out = []
  for t in study.get_trials(deepcopy=False):
    state = state_of(t)
    if state == "surplus":  # never run
      continue
    value = t.value if t.state.name == "COMPLETE" else (
        t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    out.append({"trial": t.number, "state": state, "value": value, **t.params,
                "last_intermediate_eval": max(t.intermediate_values) if t.intermediate_values else "",
                "seconds": round(seconds, 1) if seconds is not None else "",
                "workdir": t.user_attrs.get("workdir", ""), "error": t.user_attrs.get("error", "")})
  return out


def fields(study) -> list[str]:
  """The parameters the study's trials sampled, in the order they first appear."""
  return list(dict.fromkeys(k for t in study.get_trials(deepcopy=False) for k in t.params))


def write(study, directory: str, metric: str, fields: list[str]) -> list[str]:
  """Writes results.md, results.csv and the plots; returns the paths written."""
  table = rows(study)
  columns = ["trial", "state", "value", *fields, "last_intermediate_eval", "seconds", "workdir", "error"]
  csv_path = os.path.join(directory, "results.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, columns, extrasaction="ignore")
    w.writeheader()
    for r in table:
      w.writerow({k: r.get(k, "") for k in columns})
  best = _best(study)
  md = [f"# Sweep {study.study_name}: {metric} ({study.direction.name.lower()})", ""]
  if best is not None:
    md += [f"Best: trial {best.number}, {metric} {best.value:.4f}, "
           + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()), ""]
  head = ["trial", "state", metric, *fields, "last intermediate eval", "seconds", "error"]
  md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in table:
    cells = [r["trial"], r["state"], _fmt(r["value"]), *(_fmt(r.get(f, "")) for f in fields),
             r["last_intermediate_eval"], r["seconds"], r["error"][:120]]
    md.append("| " + " | ".join(map(str, cells)) + " |")
  md_path = os.path.join(directory, "results.md")
  with open(md_path, "w") as f:
    f.write("\n".join(md) + "\n")
  return [md_path, csv_path, *_plots(table, directory, metric, fields)]


def _plots(table, directory, metric, fields) -> list[str]:
  from matplotlib.figure import Figure  # no pyplot: a library never switches the caller's backend

  scored = [r for r in table if r["value"] is not None and math.isfinite(r["value"])]
  if not scored:
    return []
  colors = {"complete": "C0", "pruned": "C1", "running": "C2", "interrupted": "C3", "failed": "C3"}
  paths = []
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.subplots()
  for state in sorted({r["state"] for r in scored}):
    pts = [r for r in scored if r["state"] == state]
    ax.plot([r["trial"] for r in pts], [r["value"] for r in pts], "o", color=colors.get(state, "C4"),
            label=state + (" (last eval)" if state != "complete" else ""))
  ax.set_xlabel("trial")
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  paths.append(os.path.join(directory, "objective_per_trial.png"))
  fig.savefig(paths[-1], dpi=100)
  fig = Figure(figsize=(4 * len(fields), 3.5), layout="constrained")
  axes = fig.subplots(1, len(fields), squeeze=False)
  for ax, field in zip(axes[0], fields):
    pts = [r for r in scored if field in r]
    xs = [r[field] for r in pts]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if not numeric:
      labels = sorted({str(x) for x in xs})
      xs = [labels.index(str(x)) for x in xs]
      ax.set_xticks(range(len(labels)), labels)
    for state in sorted({r["state"] for r in pts}):
      ax.scatter([x for x, r in zip(xs, pts) if r["state"] == state], [r["value"] for r in pts if r["state"] == state],
                 color=colors.get(state, "C4"), label=state + (" (last eval)" if state != "complete" else ""))
    ax.legend(fontsize=7)
    if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 20:
      ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  paths.append(os.path.join(directory, "objective_by_param.png"))
  fig.savefig(paths[-1], dpi=100)
  return paths


def _best(study):
  try:
    return study.best_trial
  except ValueError:
    return None


def _fmt(v) -> str:
  if v is None or v == "":
    return ""
  return f"{v:.4g}" if isinstance(v, float) else str(v)
