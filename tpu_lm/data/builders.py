"""TFDS builders for corpora that live on this machine: no network needed.

`PythonStdlib` is the default corpus: the `.py` files of the running Python's
standard library, split into train/validation by a hash of each file's relative
path, so the split never changes between runs or machines, and written as
array_record for random access. (Your own text files need no builder: `text_files`
reads them in place, see documents.py.) `Instructions` reads JSONL files of
{"prompt", "completion"} pairs (split by a hash of each pair), and
`StdlibFunctions` is an offline classification task: which of the standard
library's ten largest packages a function comes from, held out by file.

Importing this module imports TensorFlow Datasets (and building imports
TensorFlow), which costs seconds: only `data.sources` imports it, and only when
a dataset has to be built or opened (not when its tokenized cache exists). Which
files go where is decided in local_files.py, without TFDS.
"""

import os
import pathlib
import sys

import hashlib
import json

from tpu_lm.data.local_files import (fingerprint, functions_in, is_validation, read_text, split_files,
                                     stdlib_files, stdlib_function_files, user_files)
from tpu_lm.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow_datasets as tfds  # noqa: E402  (after the log level is set)

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


class Instructions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """{"prompt", "completion"} pairs from local JSONL files, split by a hash of each pair."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, path: str, **kwargs):
    self._root, self._relpaths = user_files(path)
    config = tfds.core.BuilderConfig(name="h" + fingerprint(self._root, self._relpaths))
    super().__init__(file_format="array_record", config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "completion": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = list(self._pairs())  # (key, content hash, pair)
    if len(pairs) < 2:
      raise UserError(f"data.path holds {len(pairs)} prompt/completion pair(s): a train/validation split needs at least 2.")
    # By content, so a pair repeated in the files never lands on both sides.
    val = {h for _, h, _ in pairs if is_validation(h)} or {min(h for _, h, _ in pairs)}
    return {"train": self._generate_examples([(k, p) for k, h, p in pairs if h not in val]),
            "validation": self._generate_examples([(k, p) for k, h, p in pairs if h in val])}

  def _generate_examples(self, pairs):
    yield from pairs

  def _pairs(self):
    for rel in self._relpaths:
      for n, line in enumerate(read_text(self._root / rel).splitlines(), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          pair = {"prompt": record["prompt"], "completion": record["completion"]}
          if not all(isinstance(v, str) for v in pair.values()):
            raise TypeError
        except (ValueError, KeyError, TypeError):
          raise UserError(
              f"{self._root / rel}:{n} is not a JSON object with string fields \"prompt\" and \"completion\":"
              " fix that line.") from None
        yield f"{rel}:{n}", hashlib.sha256(json.dumps(pair, sort_keys=True).encode()).hexdigest(), pair


class StdlibFunctions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Functions of the standard library, labelled with the top-level package they come
  from (its ten largest, tests excluded); 20% of each package's files held out."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"py{sys.version_info.major}_{sys.version_info.minor}")]

  def __init__(self, **kwargs):
    self._root, self._packages = stdlib_function_files()
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "path": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(self._packages)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = {"train": [], "validation": []}
    for package, files in self._packages.items():
      for split, rels in split_files(files, per_mille=200).items():
        splits[split] += [(package, r) for r in rels]
    return {split: self._generate_examples(items) for split, items in splits.items()}

  def _generate_examples(self, items):
    for package, rel in items:
      for i, text in enumerate(functions_in(read_text(self._root / rel))):
        yield f"{rel}:{i}", {"text": text, "path": rel, "label": package}
