"""TFDS builders for corpora that live on this machine: no network needed.

`PythonStdlib` is the default corpus: the `.py` files of the running Python's
standard library. `TextFiles` takes any directory or glob of text files. Both
split into train/validation by a hash of each file's relative path, so the split
never changes between runs or machines, and both are written as array_record so
Grain can read them with random access.

Importing this module imports TensorFlow Datasets (and building imports
TensorFlow), which costs seconds: only `data.sources` imports it, and only when
a dataset has to be built or opened (not when its tokenized cache exists). Which
files go where is decided in local_files.py, without TFDS.
"""

import os
import pathlib
import sys

from tpu_lm.data.local_files import fingerprint, read_text, split_files, stdlib_files, user_files

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


class TextFiles(_LocalText):
  """Any local directory or glob of UTF-8 text files."""

  def __init__(self, *, path: str, **kwargs):
    root, relpaths = user_files(path)
    config = tfds.core.BuilderConfig(name="h" + fingerprint(root, relpaths))
    super().__init__(root=root, relpaths=relpaths, config=config, **kwargs)
