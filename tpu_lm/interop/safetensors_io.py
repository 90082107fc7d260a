"""Reading and writing Hugging Face weight files: `model.safetensors`, or shards
listed in `model.safetensors.index.json`. Arrays are numpy; bfloat16 tensors
come through as ml_dtypes' bfloat16, so nothing is rounded on the way."""

import json
import os

import numpy as np

from tpu_lm.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read(directory: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  files = _weight_files(directory)
  tensors = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a cut file
      raise UserError(f"{path} is not a readable safetensors file ({str(e)[:200]}): download it again.") from None
  return tensors


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


def write(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 4 << 30) -> None:
  """One file, or shards of at most `max_shard_bytes` plus an index, as
  `save_pretrained` writes them (metadata format "pt", which transformers requires)."""
  from safetensors.numpy import save_file

  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SINGLE), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(v.nbytes for v in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
