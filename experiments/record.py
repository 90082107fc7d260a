"""Results files of the experiments: each run's entry goes on top (newest first), under
the file's header, so a reader sees the latest measurement first."""

import json
import os
import subprocess
import sys

CPU_SPEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "tools",
                         "cpu_speed.py")


def speed_factor() -> str:
  """This machine's speed against the 2-core reference (../shared/tools/cpu_speed.py), as
  "speed factor F" (or "speed factor unmeasured" where the tool is absent)."""
  out = subprocess.run([sys.executable, CPU_SPEED], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines = out.stdout.strip().splitlines()
  try:
    return f"speed factor {json.loads(lines[-1])['speed_factor']}"
  except (IndexError, ValueError, KeyError):
    return "speed factor unmeasured"


def prepend(path: str, entry: str, header: str, replace_latest: bool = False) -> None:
  """Writes `entry` (starting with "### ") above the earlier entries of `path`; with
  `replace_latest`, in place of the newest one (a refit of the same runs)."""
  previous = open(path).read() if os.path.exists(path) else f"# {header}\n\n"
  at = previous.find("### ") if "### " in previous else len(previous)
  if replace_latest and at < len(previous):
    following = previous.find("### ", at + 4)
    previous = previous[:at] + (previous[following:] if following > 0 else "")
  with open(path, "w") as f:
    f.write(previous[:at] + entry.rstrip() + "\n\n" + previous[at:])


def publish(path: str, title: str, lines: list[str], header: str, replace_latest: bool = False) -> None:
  """Prints a results entry (a "### " title over its lines) and puts it on top of `path`."""
  entry = "\n".join([title, "", *lines])
  print(entry)
  prepend(path, entry, header, replace_latest)
