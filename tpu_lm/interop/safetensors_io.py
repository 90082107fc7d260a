"""Reading and writing Hugging Face weight files: `model.safetensors`, or shards
listed in `model.safetensors.index.json`.

The format is small enough to handle directly (8 bytes of header length, a JSON
header of names, dtypes, shapes and byte offsets, then the raw little-endian
data), and doing so covers bfloat16, which the `safetensors` package's NumPy
reader refuses: tensors come back as memory-mapped NumPy arrays (bfloat16 as
ml_dtypes' type), so nothing is rounded and nothing is read until used.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from tpu_lm.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read(directory: str) -> dict[str, np.ndarray]:
  from tpu_lm.progress import Progress

  tensors = {}
  files = _weight_files(directory)
  total = sum(os.path.getsize(p) for p in files)
  progress, done = Progress(f"reading {len(files)} weight file(s), {total / 2**30:.2f} GiB", every_s=5.0), 0
  for path in files:
    tensors.update(read_file(path))
    done += os.path.getsize(path)
    progress.update(done / max(total, 1), f"{done / 2**30:.2f} GiB")
  progress.done()
  return tensors


def read_file(path: str) -> dict[str, np.ndarray]:
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      start, end = info["data_offsets"]
      if end > data.size:
        raise ValueError(f"{name} ends past the end of the file")
      out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out
  except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
    raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:160]}): download it"
                    " again.") from None


def _weight_files(directory: str) -> list[str]:
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f"{index} is not a readable shard index ({e}): download it again.") from None
    missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
    if missing:
      raise UserError(f"{directory} lacks the weight shards {missing[:3]} named in {INDEX}: download them too.")
    return [os.path.join(directory, s) for s in shards]
  if any(os.path.exists(os.path.join(directory, f)) for f in ("pytorch_model.bin", "model.pt")):
    raise UserError(
        f"{directory} has PyTorch pickle weights only: tpu_lm reads safetensors (never pickles); convert them"
        " with transformers (from_pretrained(...).save_pretrained(dir, safe_serialization=True))."
    )
  raise UserError(f"{directory} has no {SINGLE} or {INDEX}: pass a Hugging Face model directory.")


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  header, offset = {}, 0
  for name, value in tensors.items():
    header[name] = {"dtype": _NAMES[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value).tobytes())


def write(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 4 << 30) -> None:
  """One file, or shards of at most `max_shard_bytes` plus an index, as
  `save_pretrained` writes them (metadata format "pt", which transformers requires)."""
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    write_file(os.path.join(directory, SINGLE), shards[0], {"format": "pt"})
    return
  from tpu_lm.progress import Progress

  weight_map = {}
  total = sum(v.nbytes for v in tensors.values())
  progress, done = Progress(f"writing {len(shards)} weight shards, {total / 2**30:.2f} GiB", every_s=5.0), 0
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file(os.path.join(directory, name), shard, {"format": "pt"})
    weight_map.update({k: name for k in shard})
    done += sum(v.nbytes for v in shard.values())
    progress.update(done / total, f"{done / 2**30:.2f} GiB")
  progress.done()
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
