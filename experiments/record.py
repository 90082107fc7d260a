"""Results files of the experiments: each run's entry goes on top (newest first), under
the file's header, so a reader sees the latest measurement first."""

import os


def prepend(path: str, entry: str, header: str) -> None:
  """Writes `entry` (starting with "### ") above the earlier entries of `path`."""
  previous = open(path).read() if os.path.exists(path) else f"# {header}\n\n"
  at = previous.find("### ") if "### " in previous else len(previous)
  with open(path, "w") as f:
    f.write(previous[:at] + entry.rstrip() + "\n\n" + previous[at:])
