"""Training FLOPs and MFU, and where metrics go: console, metrics.jsonl, TensorBoard."""

import json
import math
import os
import sys
import time

import jax

from tpu_lm.progress import format_seconds  # noqa: F401  (the loop's ETA)

from tpu_lm import storage

# bf16 dense peak FLOP/s per device, by `device_kind`. TPUs report exact names,
# and "TPU v5" is the v5p (the v5e is "TPU v5 lite"), so they match whole; GPU
# names carry the form factor ("NVIDIA H100 80GB HBM3"), so they match a substring.
TPU_PEAK_FLOPS = {
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}
GPU_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12))


def flops_per_token(num_params_no_pos: int, num_layers: int, d_model: int, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12·L·d·T (PaLM appendix B; nanoGPT).

  6N covers the forward and backward matmuls with the weights, 12·L·d·T the
  attention scores and weighted sums; N excludes position embeddings.
  """
  return 6 * num_params_no_pos + 12 * num_layers * d_model * seq_len


def peak_flops_per_device(configured: float) -> float:
  """The configured peak, else the accelerator's from the table; 0 when unknown (CPU)."""
  if configured:
    return configured
  return peak_flops_for_kind(jax.devices()[0].device_kind)


def peak_flops_for_kind(kind: str) -> float:
  if kind.startswith("TPU"):
    return TPU_PEAK_FLOPS.get(kind, 0.0)
  return next((f for name, f in GPU_PEAK_FLOPS if name in kind), 0.0)


def console(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class StepTimer:
  """Seconds per step over the steps since the last restart. The loop restarts it
  after an eval, so a logging window that holds an eval measures only the steps
  after it (counting the earlier ones against the shorter time doubled the rate)."""

  def __init__(self, clock=time.time):
    self._clock = clock
    self.restart()

  def restart(self) -> None:
    self._start, self._steps = self._clock(), 0

  def tick(self) -> None:
    self._steps += 1

  def seconds_per_step(self) -> float:
    return (self._clock() - self._start) / max(self._steps, 1)


def classification_table(result: dict) -> str:
  """Per-class precision/recall/F1 and the confusion matrix as console lines ('' if
  the eval has none)."""
  per_class = result.get("eval_per_class")
  if not per_class:
    return ""
  width = max(len(n) for n in per_class)
  lines = [f"  {'class':<{width}}  precision  recall     f1  support"]
  lines += [f"  {n:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}"
            for n, c in per_class.items()]
  lines.append("  confusion (rows: true, columns: predicted):")
  lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in result["eval_confusion"]]
  return "\n" + "\n".join(lines)


class Writer:
  """Appends each record to DIR/metrics.jsonl and DIR's TensorBoard events (process 0)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """Records after `resume_step` (from a run that stopped before checkpointing
    them) are dropped: the resumed run logs those steps again, identically."""
    self._active = jax.process_index() == 0
    if not self._active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    self._path, self._lines = path, None
    if storage.is_url(path):
      # Buckets have no append: the (small) file is kept here and rewritten whole.
      self._lines = _kept_lines(path, resume_step) if storage.exists(path) else []
      self._jsonl, self._tb = None, None
      return
    if os.path.exists(path):
      _truncate_after(path, resume_step)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter

      # The purge step tells TensorBoard to drop the points an earlier attempt logged
      # past the checkpoint this one resumed from (or all of them, started from
      # scratch): they are logged again. TensorBoard reads a directory's event files in
      # name order and names carry the second they were made, so the nanosecond suffix
      # keeps a restart within the same second after (and apart from) the attempt before.
      self._tb = SummaryWriter(workdir, flush_secs=30, purge_step=resume_step + 1,
                               filename_suffix=f".{time.time_ns()}")
    except ImportError:  # TensorBoard files are optional; metrics.jsonl is not
      print("tensorboardX is not installed: no TensorBoard event files.", file=sys.stderr)
      self._tb = None

  def write(self, step: int, record: dict) -> None:
    if not self._active:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in record.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      storage.write_atomic(self._path, "".join(self._lines).encode())
      return
    self._jsonl.write(line)
    self._jsonl.flush()
    if self._tb:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._active and self._jsonl:
      self._jsonl.close()
      if self._tb:
        self._tb.close()


def _kept_lines(path: str, step: int) -> list[str]:
  with storage.open(path) as f:
    return _kept(f.readlines(), step)


def _kept(lines: list[str], step: int) -> list[str]:
  """The records up to `step`; a line cut short by a kill is dropped."""
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  return kept


def _truncate_after(path: str, step: int) -> None:
  with open(path) as f:
    lines = f.readlines()
  kept = _kept(lines, step)
  if len(kept) != len(lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
