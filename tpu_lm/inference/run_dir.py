"""A run directory read back for inference: its config, newest parameters and
tokenizer, assembled into a `decode.Decoder`.

Everything comes from the run directory itself (the config is saved in every
checkpoint, the tokenizer next to them), so `generate` and `serve` need only
`--workdir`. Only the parameters are read from the checkpoint (an Orbax partial
restore: the optimizer state, twice the parameters' size, stays on disk), and
they are cast once to the compute dtype. Nothing is created, changed or deleted
in the run directory, and nothing of training (optimizer, input pipeline,
TensorFlow) is imported.
"""

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from tpu_lm.config import checks, derived
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import decode
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer
from tpu_lm.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Run:
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  decoder: decode.Decoder

  def encode_prompt(self, text: str) -> list[int]:
    """[BOS] + tokens: prompts start the way every training document did."""
    return [self.tokenizer.bos_id, *(int(t) for t in self.tokenizer.encode_batch([text])[0])]


def load(workdir: str, *, step: int | None = None, tensor_parallel: int = 1, devices=None) -> Run:
  """The run's newest (or `step`'s) checkpoint on `devices` (default: all), split
  `tensor_parallel` ways over heads/MLP/vocab and data-parallel over the rest."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise UserError(
        f"{workdir} has no checkpoints/ directory: pass the --workdir of a run trained with"
        " python -m tpu_lm.main."
    )
  # The items training writes (training/checkpoint.py); "data" is never read here.
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, max_to_keep=None, save_interval_steps=0, enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=options,
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
  )
  steps = list(mngr.all_steps())
  if not steps:
    raise UserError(f"{ckpt_dir} holds no complete checkpoint yet: let the run save one first.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"there is no checkpoint at step {step} in {ckpt_dir}: it has steps {sorted(steps)}.")
  tokenizer = tokenizer_lib.load_for_run(workdir)
  with _readable(ckpt_dir, step):
    config = ml_collections.ConfigDict(mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
  checks.validate(config)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor_parallel}, devices)
  rules = mesh_lib.rules_tuple(config.mesh.rules)
  model_cfg = derived.model_config(config, platform=mesh.devices.flat[0].platform)
  with mesh_lib.context(mesh, rules):
    abstract, specs = params_lib.abstract_params(transformer.Transformer(model_cfg))
    shardings = mesh_lib.logical_sharding(specs, mesh, rules)
  mesh_lib.check_divisible(abstract, shardings)
  mesh_lib.check_heads(model_cfg.num_heads, model_cfg.num_kv_heads, mesh, rules)
  # Each parameter is read straight into the compute dtype, onto its devices.
  dtype = jax.numpy.dtype(model_cfg.dtype)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype), shardings)
  with _readable(ckpt_dir, step):
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))["state"]
  params = state["params"]
  _check_shapes(params, abstract, ckpt_dir, step)
  decoder = decode.Decoder(
      model_cfg, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size,
      context=lambda: mesh_lib.context(mesh, rules), batch_multiple=mesh.shape["data"],
  )
  jax.block_until_ready(decoder.params)
  return Run(workdir, step, config, tokenizer, decoder)


class _readable:
  """Orbax's many exception types for missing or cut files, as one UserError."""

  def __init__(self, ckpt_dir: str, step: int):
    self._where = f"{ckpt_dir}/{step}"

  def __enter__(self):
    return self

  def __exit__(self, kind, e, _tb):
    if e is None or isinstance(e, UserError) or not isinstance(e, Exception):
      return False
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(
        f"the checkpoint {self._where} could not be read ({type(e).__name__}: {detail}): it is damaged or"
        " incomplete; pass --step with an older one."
    ) from None


def _check_shapes(params, abstract, ckpt_dir: str, step: int) -> None:
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract)):
    if got.shape != want.shape:
      raise UserError(
          f"the checkpoint {ckpt_dir}/{step} does not match its own config: {jax.tree_util.keystr(path)} has"
          f" shape {got.shape}, the config makes {want.shape}."
      )
