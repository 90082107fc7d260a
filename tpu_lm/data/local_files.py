"""The local corpora's files: which ones, which split, and a fingerprint of them.

No TensorFlow here: `sources` uses the fingerprint to find a warm cache without
opening the dataset, and `builders` (TFDS) uses the same rules to build it.
"""

import glob
import hashlib
import os
import pathlib
import sysconfig

from tpu_lm.errors import UserError

VALIDATION_PER_MILLE = 50  # ~5% of files go to validation


def is_validation(relpath: str, per_mille: int = VALIDATION_PER_MILLE) -> bool:
  """The fixed train/validation rule: a hash of the path, not a random draw."""
  digest = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
  return int(digest, 16) % 1000 < per_mille


def split_files(relpaths: list[str], per_mille: int = VALIDATION_PER_MILLE) -> dict[str, list[str]]:
  """Splits sorted relative paths into train and validation.

  A small directory can have no file that hashes into validation; then the file
  with the smallest hash is held out, so both splits are never empty.
  """
  relpaths = sorted(relpaths)
  if len(relpaths) < 2:
    raise UserError(
        f"found {len(relpaths)} text file(s) but a train/validation split needs"
        " at least 2: point data.path at a directory or glob with more files."
    )
  val = [p for p in relpaths if is_validation(p, per_mille)]
  if not val:
    val = [min(relpaths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())]
  train = [p for p in relpaths if p not in set(val)]
  return {"train": train, "validation": val}


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
  """The running Python's standard-library `.py` files, without site-packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  rel = [
      p.relative_to(root).as_posix()
      for p in root.rglob("*.py")
      if p.is_file() and "site-packages" not in p.relative_to(root).parts
  ]
  return root, sorted(rel)


def user_files(path: str) -> tuple[pathlib.Path, list[str]]:
  """Files under a directory (recursively) or matching a glob, hidden ones skipped."""
  expanded = os.path.expanduser(path)
  if os.path.isdir(expanded):
    root = pathlib.Path(expanded).resolve()
    found = [p for p in root.rglob("*") if p.is_file()]
  else:
    matches = sorted(glob.glob(expanded, recursive=True))
    found = [pathlib.Path(m).resolve() for m in matches if os.path.isfile(m)]
    # The glob's fixed prefix is the root, so relative paths stay readable.
    prefix = expanded.split("*")[0].split("?")[0].split("[")[0]
    root = pathlib.Path(os.path.dirname(prefix) or ".").resolve()
    if not found and not os.path.exists(prefix or "."):
      raise UserError(
          f"data.path {path!r} does not exist: give a directory of text files"
          " or a glob such as '/data/*.txt'."
      )
  rel = []
  for p in found:
    r = p.relative_to(root)
    if any(part.startswith(".") for part in r.parts):
      continue
    if not os.access(p, os.R_OK):
      raise UserError(f"cannot read {p}: fix its permissions or leave it out of data.path.")
    rel.append(r.as_posix())
  if not rel:
    raise UserError(
        f"data.path {path!r} matches no files: point it at a directory or glob"
        " that holds text files."
    )
  return root, sorted(rel)


# Packages whose functions make the offline classification task: the ten largest
# top-level packages of the standard library by function count (3.11), tests left out.
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_function_files(num_classes: int = 10) -> tuple[pathlib.Path, dict[str, list[str]]]:
  """{package: its .py files} for the `num_classes` largest packages, test code excluded."""
  import ast

  root, rel = stdlib_files()
  by_package, counts = {}, {}
  for r in rel:
    parts = r.split("/")
    if len(parts) < 2 or parts[0] in _TEST_DIRS or _TEST_DIRS & set(parts[1:-1]):
      continue
    if not (root / parts[0] / "__init__.py").exists():
      continue
    try:
      tree = ast.parse((root / r).read_bytes())
    except (SyntaxError, ValueError):
      continue
    n = sum(isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef)) for x in ast.walk(tree))
    by_package.setdefault(parts[0], []).append(r)
    counts[parts[0]] = counts.get(parts[0], 0) + n
  top = sorted(sorted(counts), key=lambda k: -counts[k])[:num_classes]
  return root, {k: sorted(by_package[k]) for k in sorted(top)}


def functions_in(source: str) -> list[str]:
  """The source of every function and method that is not nested in another function."""
  import ast

  tree = ast.parse(source)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      is_fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if is_fn and not in_function:
        text = ast.get_source_segment(source, child)
        if text:
          out.append(text)
      visit(child, in_function or is_fn)

  visit(tree, False)
  return out


def fingerprint(root: pathlib.Path, relpaths: list[str]) -> str:
  """Changes whenever a file is added, removed or modified: a stale cache rebuilds."""
  h = hashlib.sha256(str(root).encode())
  for r in relpaths:
    st = (root / r).stat()
    h.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def read_text(path: pathlib.Path) -> str:
  # A few stdlib test files are deliberately not UTF-8; replacing their bad bytes
  # keeps the corpus deterministic instead of dropping files.
  return path.read_bytes().decode("utf-8", errors="replace")
