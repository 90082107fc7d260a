"""Starting a run from another run's parameters (`init_from`): fine-tuning.

The source is any run directory: trained here (its newest checkpoint), converted
from Hugging Face, or itself fine-tuned (LoRA adapters are merged first). Its
architecture must be this config's; the first difference is one line naming the
field. Parameters this model has and the source lacks (a classification head,
fresh LoRA adapters) keep their initialisation; the optimizer starts fresh at
step 0.
"""

import jax

from tpu_lm.config import derived
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.model import params as params_lib
from tpu_lm.training import metrics as metrics_lib
from tpu_lm.training.trainable import param_path


def source_tokenizer(path: str, field: str = "init_from"):
  """The tokenizer the source run (config `field`) was trained with (the new run must speak it)."""
  from tpu_lm.data import tokenizer as tokenizer_lib

  try:
    run_dir.resolve_step(_workdir(path))  # a run directory at all?
    return tokenizer_lib.load_for_run(_workdir(path))
  except UserError as e:
    raise UserError(f"{field}={path}: {e}") from None


def _workdir(path: str) -> str:
  from tpu_lm import storage

  return storage.absolute(path)


def check(setup, path: str) -> tuple[int, object]:
  """(step, saved config) of the source, after checking its architecture is ours."""
  workdir = _workdir(path)
  step = run_dir.resolve_step(workdir)
  saved = run_dir.read_config(workdir, step)
  if run_dir.quantized(saved):
    raise UserError(f"init_from={path} holds {saved.quant.weight_qtype} kernels (python -m tpu_lm.compress wrote"
                    " it): fine-tune the float run it came from, then compress the result.")
  source_cfg = derived.model_config(saved)
  if "bidirectional" in (source_cfg.attention_mask, setup.model_cfg.attention_mask) and (
      source_cfg.attention_mask != setup.model_cfg.attention_mask):
    encoder = source_cfg.attention_mask == "bidirectional"
    raise UserError(
        f"init_from={path} is {'an encoder' if encoder else 'a decoder'} (its attention is"
        f" {source_cfg.attention_mask}), this config's attention is {setup.model_cfg.attention_mask}: the parameters"
        f" mean what they were trained to mean only with the same mask (set"
        f" task.attention={'bidirectional' if encoder else 'causal'!r} for a classifier).")
  diff = derived.architecture_difference(source_cfg, setup.model_cfg)
  if diff:
    field, theirs, ours = diff
    raise UserError(
        f"init_from={path} has {field}={theirs!r}, this config {ours!r}: starting from its parameters needs the"
        f" same architecture (set {field.split(' ')[0]}={theirs!r}, or use configs/finetune.py:{path}, which"
        " copies it).")
  return step, saved


def load(setup, path: str, fresh_params):
  """`fresh_params` (this model's initialisation) with every parameter the source has."""
  step, saved = check(setup, path)
  workdir = _workdir(path)
  source, _, _ = run_dir.read_model(workdir, step, saved, setup.mesh, dtype="float32")
  if saved.model.scan_layers and not setup.model_cfg.scan_layers:
    source = params_lib.unstack_layers(source)
  elif setup.model_cfg.scan_layers and not saved.model.scan_layers:
    source = params_lib.stack_layers(source, setup.model_cfg.num_layers)
  by_name = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(source)}
  used, new = set(), []

  def take(path, fresh, sharding):
    name = param_path(path)
    if name not in by_name:
      new.append(name)
      return fresh
    if by_name[name].shape != fresh.shape:
      raise UserError(f"init_from={path}: {name} has shape {by_name[name].shape} there, {fresh.shape} here.")
    used.add(name)
    return jax.device_put(by_name[name].astype(fresh.dtype), sharding)

  params = jax.tree_util.tree_map_with_path(take, fresh_params, setup.state_shardings.params)
  unused = sorted(set(by_name) - used)
  metrics_lib.console(
      f"init_from {workdir} (step {step}): {len(used)} parameter arrays loaded"
      + (f"; new here: {_names(new)}" if new else "") + (f"; not used here: {_names(unused)}" if unused else ""))
  return params


def _names(names: list[str]) -> str:
  """A few names, or a count (LoRA adds two arrays per projection)."""
  names = sorted(names)
  adapters = [n for n in names if n.endswith(("_lora_a", "_lora_b"))]
  rest = [n for n in names if n not in adapters]
  parts = ([f"{len(adapters)} LoRA adapter arrays"] if adapters else []) + rest[:6]
  return ", ".join(parts) + (f" and {len(rest) - 6} more" if len(rest) > 6 else "")
