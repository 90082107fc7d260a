"""Paths on this machine's disks or in a bucket (`gs://...`, any URL TensorFlow's file
system reaches): the few file operations tpu_lm does itself. TFDS and Orbax handle
bucket paths on their own; TensorFlow is imported only when a URL is used."""

import builtins
import os


def is_url(path: str) -> bool:
  return "://" in str(path)


def _gfile():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf

  return tf.io.gfile


def absolute(path: str) -> str:
  return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


def open(path: str, mode: str = "r"):  # noqa: A001 (the builtin's name, on purpose)
  return _gfile().GFile(path, mode) if is_url(path) else builtins.open(path, mode)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  return [p.rstrip("/") for p in _gfile().listdir(path)] if is_url(path) else os.listdir(path)


def makedirs(path: str) -> None:
  _gfile().makedirs(path) if is_url(path) else os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  _gfile().remove(path) if is_url(path) else os.remove(path)


def getsize(path: str) -> int:
  return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def write_atomic(path: str, data: bytes) -> None:
  """Written under a temporary name and renamed: a crash never leaves half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  if is_url(path):
    _gfile().rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)


def check_writable(directory: str, flag: str) -> None:
  """UserError unless files can be written in `directory` (made if missing): commands
  that write results check before their work, not after it."""
  from tpu_lm.errors import UserError

  try:
    makedirs(directory)
    probe = os.path.join(directory, f".write_check_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("")
    remove(probe)
  except OSError as e:
    raise UserError(f"cannot write results to {directory} ({e.strerror or e}): pass a writable {flag}.") from None
