"""Everything compiled for one config on one mesh: model, task, optimizer,
shardings and the jitted steps."""

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax

from tpu_lm import tasks
from tpu_lm.config import derived
from tpu_lm.errors import UserError
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import metrics as metrics_lib
from tpu_lm.training import optim, prune, trainable
from tpu_lm.training.state import init_boxed
from tpu_lm.training.step import StepOptions, eval_step, train_step


class Setup:
  def __init__(self, config, mesh, task=None):
    """`task`: the run's objective (tasks/), default the config's (a classifier's needs
    the dataset's class names: built where they are known)."""
    self.config, self.mesh = config, mesh
    self.reader = None  # a reading objective's eval decoder (evaluate.read_images), compiled once
    self.rules = mesh_lib.rules_tuple(config.mesh.rules)
    self.task = task or tasks.from_config(config)
    self.model_cfg = dataclasses.replace(
        derived.model_config(config, platform=mesh.devices.flat[0].platform),
        num_classes=getattr(self.task, "num_classes", 0))
    deterministic = self.model_cfg.dropout_rate == 0
    self.train_model = self._model(transformer.Transformer(self.model_cfg, deterministic=deterministic))
    self.eval_model = self._model(transformer.Transformer(self.model_cfg, deterministic=True))
    # Which parameters train (all, unless optim.freeze or LoRA say otherwise).
    o = config.optim
    mask_fn = None
    if o.freeze or config.lora.rank:
      mask_fn = functools.partial(trainable.mask, freeze=tuple(o.freeze), lora_rank=config.lora.rank)
    self.tx = optim.make(config.optim, config.num_train_steps, trainable=mask_fn)
    self.prune = prune.Spec.from_config(config.prune)
    if self.prune.active:  # masks in the optimizer state: pruned weights stay zero
      self.tx = prune.masked(self.tx, self.prune)
    self.lr = optim.schedule(config.optim, config.num_train_steps)
    dynamic_scale = o.loss_scale == "dynamic" or (o.loss_scale == "auto" and self.model_cfg.dtype == "float16")
    self.step_options = StepOptions(
        seed=config.seed, l1=o.l1_penalty, log_every=config.log_every_steps, accum_steps=o.grad_accum_steps,
        dynamic_scale=dynamic_scale, scale_period=o.loss_scale_period,
    )
    init = functools.partial(
        init_boxed, model=self.eval_model, tx=self.tx, seq_len=config.data.seq_len,
        loss_scale=o.loss_scale_init if dynamic_scale else 1.0,
    )
    key = jax.random.key(0)  # made outside the mesh context: the mesh may be a TPU slice described only (aot.py)
    with self.context():
      abstract = jax.eval_shape(init, key)
      shardings = mesh_lib.logical_sharding(nn.get_partition_spec(abstract), mesh, self.rules)
      self.abstract_state = jax.eval_shape(lambda rng: nn.meta.unbox(init(rng)), key)
      # Optimizer statistics need not have their parameter's shape (Adafactor's
      # factored moments are vectors): fit their shardings to what they are.
      shardings = shardings.replace(
          opt_state=mesh_lib.fit_shardings(shardings.opt_state, self.abstract_state.opt_state))
      mesh_lib.check_divisible(self.abstract_state, shardings)
      mesh_lib.check_heads(self.model_cfg.num_heads, self.model_cfg.num_kv_heads, mesh, self.rules)
    self.state_shardings = shardings
    self.trainable = mask_fn(self.abstract_state.params) if mask_fn else None
    if self.trainable is not None and not any(jax.tree.leaves(self.trainable)):
      raise UserError("optim.freeze (with LoRA: everything but the adapters) freezes every parameter:"
                      " leave some to train.")
    self.batch_sharding = mesh_lib.batch_sharding(mesh, self.rules)
    self.init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_shardings)
    # A distillation teacher's parameters: an argument of the step, frozen.
    self.frozen, frozen_shardings = None, None
    if isinstance(self.task, tasks.distill.Distill):
      self.task, self.frozen = distill_teacher(config, mesh, self.task)
      frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
    self._frozen_shardings = frozen_shardings
    self._build_train_step()
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.eval_model, task=self.task),
        in_shardings=(self.state_shardings.params, self.batch_sharding),
    )

  def _build_train_step(self) -> None:
    step = jax.jit(
        functools.partial(train_step, model=self.train_model, task=self.task, tx=self.tx, lr_schedule=self.lr,
                          opts=self.step_options, trainable=self.trainable),
        in_shardings=(self.state_shardings, self.batch_sharding, self._frozen_shardings),
        out_shardings=(self.state_shardings, None),
        donate_argnums=0,
    )
    self.train_step = _Step(step, self.frozen)

  def use_private_step(self, clip_norm: float, noise_multiplier: float, expected_batch: float) -> None:
    """DP-SGD from here on (privacy/gradients.py): known once the data is, so set after."""
    from tpu_lm.privacy import gradients

    rows = self.config.data.global_batch_size
    dp = gradients.DpOptions(clip_norm, noise_multiplier, expected_batch,
                           microbatch=rows // self.step_options.accum_steps if self.step_options.accum_steps > 1 else None,
                           batch_axes=_axes(self.batch_sharding.spec[0]))
    self.step_options = dataclasses.replace(self.step_options, dp=dp)
    self._build_train_step()

  def _model(self, model):
    c, q = self.config.lora, self.config.quant
    if q.qat:  # fake quantization in the forward pass, straight-through gradients
      from tpu_lm.model import quant

      return quant.qat_model(model, quant.Spec.from_config(q))
    if not c.rank:
      return model
    from tpu_lm.model import lora

    return lora.apply(model, rank=c.rank, alpha=c.alpha, targets=c.targets)

  def trainable_summary(self) -> str:
    mask = self.trainable if self.trainable is not None else jax.tree.map(lambda _: True, self.abstract_state.params)
    return trainable.summary(self.abstract_state.params, mask, self.abstract_state.opt_state)

  def context(self):
    """Mesh and logical rules for tracing: the models' sharding constraints read them."""
    return mesh_lib.context(self.mesh, self.rules)

  def device_batch(self, local_batch: dict) -> dict:
    """This process's rows -> one global array per field, sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()
    }

  def flops_per_step(self) -> float:
    n = params_lib.num_params(self.abstract_state.params, exclude_positions=True)
    d = self.config.data
    return metrics_lib.flops_per_token(n, self.model_cfg.num_layers, self.model_cfg.d_model, d.seq_len) * (
        d.global_batch_size * d.seq_len
    )


def _axes(entry) -> tuple:
  """A PartitionSpec entry as a tuple of mesh axes."""
  return () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


class _Step:
  """The jitted train step as `(state, batch)`, the frozen arguments (a teacher) bound:
  called, lowered and compiled like the jitted function it wraps."""

  def __init__(self, fn, frozen):
    self._fn, self._frozen = fn, frozen

  def __call__(self, state, batch):
    return self._fn(state, batch, self._frozen)

  def lower(self, state, batch):
    return _Step(self._fn.lower(state, batch, self._frozen), self._frozen)

  def compile(self):
    return _Step(self._fn.compile(), self._frozen)

  def __getattr__(self, name):  # cost_analysis, memory_analysis, as_text, ...
    return getattr(self._fn, name)


def distill_teacher(config, mesh, objective):
  """(the Distill objective with its teacher's model, the teacher's parameters on
  `mesh`) for config.distill.teacher."""
  from tpu_lm.data import tokenizer as tokenizer_lib
  from tpu_lm.inference import run_dir

  d = config.distill
  workdir = os.path.abspath(os.path.expanduser(d.teacher))
  step = run_dir.resolve_step(workdir)
  teacher_config = run_dir.read_config(workdir, step)
  teacher_objective = tasks.from_config(teacher_config)
  if not teacher_objective.generates:
    raise UserError(f"distill.teacher {workdir} is a {teacher_objective.name} run: the teacher must be a"
                    " language model.")
  mine = derived.tokenizer_vocab_size(config)
  theirs = tokenizer_lib.load_for_run(workdir)
  if theirs.vocab_size != mine:  # (loop.py also compares the two tokenizers' encodings)
    raise UserError(f"distill.teacher {workdir} speaks a tokenizer of {theirs.vocab_size} tokens and this run"
                    f" one of {mine}: teacher and student must share a tokenizer (set data.tokenizer_path to"
                    " the teacher's tokenizer file).")
  params, teacher_cfg, _ = run_dir.read_model(workdir, step, teacher_config, mesh, dtype="float32")
  teacher = run_dir.inference_model(teacher_config, teacher_cfg)
  return dataclasses.replace(objective, teacher=teacher), params


def check_batch(config, mesh, process_count: int) -> None:
  """UserError unless the global batch splits evenly over processes (each loads its
  own rows), data-parallel devices and, within each device, the microbatches of
  gradient accumulation."""
  d, k = config.data, config.optim.grad_accum_steps
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if d.global_batch_size % math.lcm(process_count, dp * k):
    from tpu_lm.config.checks import fail

    fail(
        "data.global_batch_size", d.global_batch_size,
        f"it must be divisible by the processes ({process_count}) and by the data-parallel"
        f" devices (mesh data*fsdp = {dp})" + (f" times optim.grad_accum_steps ({k})" if k > 1 else ""),
    )
