"""Results files of the experiments, one shape for all: a "# " header, then one "### "
entry per run, newest first, each titled with its date, machine and CPU speed factor
and ending in the command that produced it.

  record.publish(os.path.join(HERE, "results.md"), "Header of the file", lines, about="what ran")
"""

import datetime
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speed_factor() -> str:
  """This machine's CPU speed factor against the 2-core reference (`tpu-lm speed`), as
  "speed factor F" ("speed factor unmeasured" if the command fails). Measured in a
  fresh process on the CPU, so the experiment's own JAX state does not weigh on it."""
  out = subprocess.run([sys.executable, "-m", "tpu_lm.speed", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    return f"speed factor {json.loads(out.stdout.strip().splitlines()[-1])['speed_factor']}"
  except (IndexError, ValueError, KeyError):
    return "speed factor unmeasured"


def machine() -> str:
  """The machine as the titles name it: "2-core CPU"; an experiment on an accelerator
  passes its own (e.g. "1 x NVIDIA H100 80GB HBM3")."""
  return f"{os.cpu_count()}-core CPU"


def command() -> str:
  """The command line this process runs, as a user would type it from the repository root."""
  name = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
  return shlex.join(["python", "-m", f"experiments.{name}.run", *sys.argv[1:]])


def title(factor: str, about: str = "", on: str = "", date: str = "") -> str:
  """'### DATE, MACHINE, speed factor F[: ABOUT]'."""
  return f"### {date or datetime.date.today()}, {on or machine()}, {factor}" + (f": {about}" if about else "")


def prepend(path: str, entry: str, header: str, replace_latest: bool = False) -> None:
  """Writes `entry` (starting with "### ") above the earlier entries of `path`; with
  `replace_latest`, in place of the newest one (a refit of the same runs, or the same
  run's entry growing row by row)."""
  previous = open(path).read() if os.path.exists(path) else f"# {header}\n\n"
  at = previous.find("### ") if "### " in previous else len(previous)
  if replace_latest and at < len(previous):
    following = previous.find("\n### ", at + 4)
    previous = previous[:at] + (previous[following + 1:] if following > 0 else "")
  with open(path, "w") as f:
    f.write(previous[:at] + entry.rstrip() + "\n\n" + previous[at:])


def publish(path: str, header: str, lines: list[str], factor: str, about: str = "", on: str = "",
            replace_latest: bool = False, quiet: bool = False) -> None:
  """Puts an entry on top of `path`: its title (date, machine, `factor`, `about`), `lines`,
  and the command that ran; prints it unless `quiet`."""
  entry = "\n".join([title(factor, about, on), "", *lines, "", f"Command: `{command()}`."])
  if not quiet:
    print(entry, flush=True)
  prepend(path, entry, header, replace_latest)


def final_eval(workdir: str) -> dict | None:
  """A run directory's last eval record (metrics.jsonl), or None before its first."""
  path = os.path.join(workdir, "metrics.jsonl")
  evals = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  evals = [r for r in evals if "eval_loss" in r]
  return evals[-1] if evals else None


def train(config: str, workdir: str, overrides: dict, fresh: bool = False) -> float:
  """`python -m tpu_lm.main` in a subprocess (SystemExit with its stderr if it fails); its
  wall time in seconds. A finished run is reused unless `fresh`: its time is read back
  (0 where none was kept)."""
  import shutil
  import time

  timing = os.path.join(workdir, "wall_s.txt")
  if not fresh and final_eval(workdir) is not None:
    return float(open(timing).read()) if os.path.exists(timing) else 0.0
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "tpu_lm.main", f"--config={config}", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in overrides.items())]
  t0 = time.time()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  wall = time.time() - t0
  with open(timing, "w") as f:
    f.write(f"{wall:.1f}")
  return wall
