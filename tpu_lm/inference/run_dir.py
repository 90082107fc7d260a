"""Run directories: the unit users pass around. Read back for inference (its config,
newest parameters and tokenizer, assembled into a `decode.Decoder`), and written
for runs that did not train here (conversion from Hugging Face).

Everything comes from the run directory itself (the config is saved in every
checkpoint, the tokenizer next to them), so `generate` and `serve` need only
`--workdir`. Only the parameters are read from a checkpoint (an Orbax partial
restore: the optimizer state, twice the parameters' size, stays on disk), and
they are read once, in the compute dtype. LoRA adapters are merged into their
kernels on the way. Reading creates, changes or deletes nothing in the run
directory, and imports nothing of training (optimizer, input pipeline,
TensorFlow).

A written run directory holds `checkpoints/<step>/` with the items `state`
(`{"params": ...}` alone) and `config`, and the tokenizer: what training would
have left, minus an optimizer state. Fine-tuning starts from one with `init_from`.
"""

import dataclasses
import logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tpu_lm import storage, tasks
from tpu_lm.config import checks, defaults, derived
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import decode
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer
from tpu_lm.parallel import mesh as mesh_lib


# Orbax warns that a manager opened read-only is read-only: that is the point here.
logging.getLogger("absl").addFilter(lambda record: "Given directory is read only" not in record.getMessage())


@dataclasses.dataclass
class Run:
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  decoder: decode.Decoder
  objective: object  # what the run was trained for (tasks/): its prompt format, whether it generates

  def score(self, sequences: list[list[int]], top: int = 0) -> list:
    """Each sequence's tokens' log-probabilities under the run's model (inference/score.py)."""
    from tpu_lm.inference import score

    return score.run_logprobs(self, sequences, top)

  def encode_prompt(self, text: str) -> list[int]:
    """`text` as the model saw texts begin: [BOS] + tokens for a run trained here, the
    tokenizer's own special tokens (as transformers adds them) for one imported from
    Hugging Face; the run directory records which (tokenizer.encode_prompt)."""
    return tokenizer_lib.encode_prompt(self.tokenizer, text)

  # What a forward pass needs, alike for decoders and encoders (EncoderRun): the
  # server's embeddings and tokenizer routes read these.
  @property
  def model(self):
    return self.decoder.model

  @property
  def params(self):
    return self.decoder.params

  @property
  def max_len(self) -> int:
    return self.decoder.max_len

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size


@dataclasses.dataclass
class EncoderRun:
  """An encoder run (task.kind="mlm") read for inference: no decoder, a forward pass
  over whole texts (inference/fill_mask.py, the server's /v1/embeddings)."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  objective: object
  model: object
  params: object
  max_len: int

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def encode_prompt(self, text: str) -> list[int]:
    """`text` as training read a document: [BOS] + its ids + [EOS] (a `<mask>` in it is
    the mask token)."""
    return [self.tokenizer.bos_id, *tokenizer_lib.encode_text(self.tokenizer, text), self.tokenizer.eos_id]


def is_encoder(workdir: str, step: int | None = None) -> bool:
  """Whether the run reads both ways (an encoder: load it with load_encoder)."""
  workdir = storage.absolute(workdir)
  return tasks.from_config(read_config(workdir, resolve_step(workdir, step))).attention == "bidirectional"


def load_encoder(workdir: str, *, step: int | None = None, devices=None) -> EncoderRun:
  """An encoder run's newest (or `step`'s) checkpoint, on the first of `devices` (default: all)."""
  workdir = storage.absolute(workdir)
  step = resolve_step(workdir, step)
  config = read_config(workdir, step)
  objective = tasks.from_config(config)
  if objective.attention != "bidirectional":
    raise UserError(f"{workdir} is a {objective.name} run, not an encoder: it reads left to right, so it fills no"
                    " masks (--fill_mask needs a run of task.kind='mlm', configs/encoder.py); sample it with --prompt.")
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, (devices or jax.devices())[:1])
  params, model_cfg, _ = read_model(workdir, step, config, mesh)
  return EncoderRun(workdir, step, config, tokenizer_lib.load_for_run(workdir), objective,
                    inference_model(config, model_cfg), params, model_cfg.max_len)


def _manager(workdir: str, *, read_only: bool = True) -> ocp.CheckpointManager:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if read_only and not storage.isdir(ckpt_dir):
    raise UserError(
        f"{workdir} has no checkpoints/ directory: pass a run directory (trained with python -m tpu_lm.main,"
        " or written by python -m tpu_lm.convert)."
    )
  # The items training writes (training/checkpoint.py); "data" is never read here.
  options = ocp.CheckpointManagerOptions(
      read_only=read_only, create=not read_only, max_to_keep=None, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      ckpt_dir, options=options,
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
  )


def resolve_step(workdir: str, step: int | None = None) -> int:
  """`step` if the run has it, else its newest complete checkpoint."""
  mngr = _manager(workdir)
  steps = list(mngr.all_steps())
  if not steps:
    raise UserError(f"{workdir}/checkpoints holds no complete checkpoint yet: let the run save one first.")
  if step is None:
    return max(steps)
  if step not in steps:
    raise UserError(f"there is no checkpoint at step {step} in {workdir}/checkpoints: it has steps {sorted(steps)}.")
  return step


def read_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  """The config the run saved at `step`, over today's defaults (fields added since
  take their defaults), validated."""
  with _readable(workdir, step):
    saved = _manager(workdir).restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = defaults.complete(saved)
  checks.validate(config)
  return config


def read_params(workdir: str, step: int, abstract, shardings, dtype=None):
  """The parameters alone, restored onto `shardings` (in `dtype`, default as saved).
  `abstract` (ShapeDtypeStructs) names what to read; a saved shape that differs is
  one UserError naming the parameter."""
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype), shardings)
  with _readable(workdir, step):
    state = _manager(workdir).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))["state"]
  params = state["params"]
  _check_shapes(params, abstract, workdir, step)
  return params


def saved_param_shapes(workdir: str, step: int) -> dict[str, tuple]:
  """{'layers_0/attn/query/kernel': shape, ...} of the saved parameters, from metadata."""
  with _readable(workdir, step):
    meta = _manager(workdir).item_metadata(step)["state"]
  if meta is None or "params" not in meta:
    raise UserError(f"the checkpoint {workdir}/checkpoints/{step} has no parameters: it is damaged.")
  return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(meta["params"])}


def model_for(config, model_cfg):
  """The model a run's parameters belong to: with LoRA adapters if it trained them."""
  model = transformer.Transformer(model_cfg)
  if config.lora.rank:
    from tpu_lm.model import lora

    model = lora.apply(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets)
  return model


def quantized(config) -> bool:
  """Whether the run directory holds quantized kernels (written by python -m tpu_lm.compress)."""
  return bool(config.quant.weight_qtype) and not config.quant.qat


def inference_wrap(config):
  """What wraps the plain model to run the parameters read_model returns: quantized
  matmuls for a quantized run, nothing otherwise (LoRA is merged on reading)."""
  if not quantized(config):
    return None
  from tpu_lm.model import quant

  spec = quant.Spec.from_config(config.quant)
  return lambda model: quant.ptq_model(model, spec)


def inference_model(config, model_cfg):
  """The model that runs read_model's parameters."""
  model = transformer.Transformer(model_cfg)
  wrap = inference_wrap(config)
  return wrap(model) if wrap else model


def load(workdir: str, *, step: int | None = None, tensor_parallel: int = 1, devices=None) -> Run:
  """The run's newest (or `step`'s) checkpoint on `devices` (default: all), split
  `tensor_parallel` ways over heads/MLP/vocab and data-parallel over the rest."""
  workdir = storage.absolute(workdir)
  step = resolve_step(workdir, step)
  tokenizer = tokenizer_lib.load_for_run(workdir)
  config = read_config(workdir, step)
  objective = tasks.from_config(config)
  if objective.attention == "bidirectional":
    raise UserError(f"{workdir} is an encoder ({objective.name} run): it reads both ways and generates nothing left"
                    " to right; ask it to fill masks with python -m tpu_lm.generate --fill_mask='... <mask> ...'.")
  if not objective.generates:
    raise UserError(f"{workdir} is a {objective.name} run: generate and serve need a language model.")
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor_parallel}, devices)
  params, model_cfg, rules = read_model(workdir, step, config, mesh)
  decoder = decode.Decoder(
      model_cfg, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size,
      context=lambda: mesh_lib.context(mesh, rules), batch_multiple=mesh.shape["data"], wrap=inference_wrap(config),
  )
  jax.block_until_ready(decoder.params)
  return Run(workdir, step, config, tokenizer, decoder, objective)


def read_model(workdir: str, step: int, config, mesh, dtype: str | None = None):
  """(params, ModelConfig, rules): the run's parameters on `mesh`, read straight
  into `dtype` (default: the compute dtype), adapters merged."""
  rules = mesh_lib.rules_tuple(config.mesh.rules)
  model_cfg = derived.model_config(config, platform=mesh.devices.flat[0].platform)
  with mesh_lib.context(mesh, rules):
    abstract, specs = params_lib.abstract_params(model_for(config, model_cfg))
    shardings = mesh_lib.logical_sharding(specs, mesh, rules)
  mesh_lib.check_divisible(abstract, shardings)
  mesh_lib.check_heads(model_cfg.num_heads, model_cfg.num_kv_heads, mesh, rules)
  dtype = jax.numpy.dtype(dtype or model_cfg.dtype)
  if quantized(config):
    return _read_quantized(workdir, step, config, model_cfg, mesh, dtype), model_cfg, rules
  schedule_free = config.optim.optimizer == "schedule_free_adamw"
  if config.lora.rank or schedule_free:  # averaged and merged in float32, then cast once
    from tpu_lm.model import lora

    params = read_params(workdir, step, abstract, shardings, jax.numpy.float32)
    if schedule_free:
      params = _schedule_free_average(workdir, step, params, shardings)
    if config.lora.rank:
      params = lora.merge(params, rank=config.lora.rank, alpha=config.lora.alpha)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  else:
    params = read_params(workdir, step, abstract, shardings, dtype)
  return params, model_cfg, rules


def _schedule_free_average(workdir: str, step: int, params, shardings):
  """A schedule-free AdamW run's model: the average x of its trained iterate (`params`)
  and the optimizer's z (as training/optim.py's eval_params evaluates it). Only z and b1 are read from the
  optimizer state. A run written without one (converted, compressed: already averaged)
  is returned as it is."""
  with _readable(workdir, step):
    meta = _manager(workdir).item_metadata(step)["state"]
    path = _path_to(meta.get("opt_state"), lambda d: isinstance(d, dict) and {"z", "b1"} <= d.keys())
    if path is None:
      return params
    state = _at(meta["opt_state"], path)
    by_name = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    z = jax.tree_util.tree_map_with_path(
        lambda p, m: jax.ShapeDtypeStruct(m.shape, jax.numpy.float32, sharding=by_name[jax.tree_util.keystr(p)]),
        state["z"])
    b1 = jax.ShapeDtypeStruct((), jax.numpy.float32)
    item = {"opt_state": _placed(meta["opt_state"], path, {"z": z, "b1": b1})}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)
                                if getattr(x, "sharding", None) else ocp.RestoreArgs(restore_type=np.ndarray), item)
    saved = _manager(workdir).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))["state"]
  state = _at(saved["opt_state"], path)
  # z holds the trained parameters only; a frozen one (absent from z) is its saved value.
  z_by_name = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state["z"])}
  return jax.tree_util.tree_map_with_path(
      lambda p, y: params_lib.schedule_free_average(y, z_by_name[jax.tree_util.keystr(p)], float(state["b1"]))
      if jax.tree_util.keystr(p) in z_by_name else y, params)


def _path_to(tree, found, path=()):
  """The keys (dict keys, list indices) from `tree` down to the first node `found` accepts."""
  if found(tree):
    return path
  children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
  for key, child in children:
    if (hit := _path_to(child, found, (*path, key))) is not None:
      return hit
  return None


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _placed(tree, path, leaf):
  """A partial-restore item: `leaf` at `path`, list siblings skipped (ocp.PLACEHOLDER),
  dict siblings left out."""
  if not path:
    return leaf
  key, *rest = path
  if isinstance(tree, (list, tuple)):
    return [_placed(tree[i], rest, leaf) if i == key else ocp.PLACEHOLDER for i in range(len(tree))]
  return {key: _placed(tree[key], rest, leaf)}


def _read_quantized(workdir, step, config, model_cfg, mesh, dtype):
  """Integer kernels and their scales, as saved (replicated: no tensor parallelism for
  quantized runs yet); the float parameters and scales in `dtype`."""
  from tpu_lm.model import quant

  abstract = quant.abstract_quantized(inference_model(config, model_cfg))
  saved = quant.saved_abstract(abstract)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = read_params(workdir, step, saved, jax.tree.map(lambda _: replicated, saved))
  params = jax.tree.map(lambda x: x.astype(dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, params)
  return quant.from_saved(params, abstract)


def check_new(workdir: str, flag: str = "--workdir") -> None:
  """UserError if `workdir` already holds a run (checkpoints or a tokenizer): the
  commands that write a new run directory call this before any work."""
  workdir = storage.absolute(workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  if (storage.isdir(ckpts) and storage.listdir(ckpts)) or storage.exists(os.path.join(workdir, tokenizer_lib.RUN_FILE)):
    raise UserError(f"{workdir} already holds a run (checkpoints or a tokenizer): pass a new {flag} directory"
                    " (nothing was overwritten).")


def write(workdir: str, config, params, tokenizer, step: int = 0, prompt: str | None = None) -> None:
  """A run directory holding `params` (a per-layer tree of arrays), `config` and
  `tokenizer`; refuses to overwrite a directory that already has checkpoints.
  `prompt` (tokenizer.PROMPT_*): how the run is prompted; by default as the run
  `tokenizer` was read from is (a compressed run keeps its source's)."""
  workdir = storage.absolute(workdir)
  check_new(workdir)
  try:
    storage.makedirs(workdir)
  except OSError as e:
    raise UserError(f"cannot create {workdir} ({e.strerror}): pass a writable --workdir.") from None
  mngr = _manager(workdir, read_only=False)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave({"params": params}), config=ocp.args.JsonSave(config.to_dict())))
  mngr.wait_until_finished()
  mngr.close()
  tokenizer_lib.save_for_run(tokenizer, workdir, prompt or tokenizer.prompt)


class _readable:
  """Orbax's many exception types for missing or cut files, as one UserError."""

  def __init__(self, workdir: str, step: int):
    self._where = f"{workdir}/checkpoints/{step}"

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


def _check_shapes(params, abstract, workdir: str, step: int) -> None:
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract)):
    if got.shape != want.shape:
      raise UserError(
          f"the checkpoint {workdir}/checkpoints/{step} does not match its config: {jax.tree_util.keystr(path)}"
          f" has shape {got.shape}, the config makes {want.shape}."
      )
