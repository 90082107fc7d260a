"""TFDS builders for corpora that live on this machine: no network needed.

`PythonStdlib` is the default corpus: the `.py` files of the running Python's
standard library. `TextFiles` takes any directory or glob of text files. Both
split into train/validation by a hash of each file's relative path, so the split
never changes between runs or machines, and both are written as array_record so
Grain can read them with random access.

Importing this module imports TensorFlow Datasets (and building imports
TensorFlow), which costs seconds: only `data.sources` imports it, and only when
a dataset has to be built or opened.
"""

import glob
import hashlib
import os
import pathlib
import sys
import sysconfig

from tpu_lm.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow_datasets as tfds  # noqa: E402  (after the log level is set)

VALIDATION_PER_MILLE = 50  # ~5% of files go to validation


def is_validation(relpath: str) -> bool:
  """The fixed train/validation rule: a hash of the path, not a random draw."""
  digest = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
  return int(digest, 16) % 1000 < VALIDATION_PER_MILLE


def split_files(relpaths: list[str]) -> dict[str, list[str]]:
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
  val = [p for p in relpaths if is_validation(p)]
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


class _LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents {path, text} from local files, split by path hash."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, root: pathlib.Path, relpaths: list[str], **kwargs):
    self._root = root
    self._relpaths = relpaths
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(
            {"path": tfds.features.Text(), "text": tfds.features.Text()}
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {
        name: self._generate_examples(files)
        for name, files in split_files(self._relpaths).items()
    }

  def _generate_examples(self, relpaths):
    for r in relpaths:
      yield r, {"path": r, "text": read_text(self._root / r)}


class PythonStdlib(_LocalText):
  """The `.py` files of the running Python's standard library (site-packages excluded)."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=f"py{sys.version_info.major}_{sys.version_info.minor}")
  ]

  def __init__(self, **kwargs):
    root, relpaths = stdlib_files()
    super().__init__(root=root, relpaths=relpaths, **kwargs)


class TextFiles(_LocalText):
  """Any local directory or glob of UTF-8 text files."""

  def __init__(self, *, path: str, **kwargs):
    root, relpaths = user_files(path)
    config = tfds.core.BuilderConfig(name="h" + fingerprint(root, relpaths))
    super().__init__(root=root, relpaths=relpaths, config=config, **kwargs)
