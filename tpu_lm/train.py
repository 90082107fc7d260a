"""Train state, the jitted train/eval steps, and the training loop.

The steps are pure functions of their arguments; the loop owns everything with
side effects (data, checkpoints, logging). The dropout key is derived from the
seed and the step, and the data order from the seed and the iterator state, so
a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

import dataclasses
import functools
import math
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from tpu_lm import checkpoint as checkpoint_lib
from tpu_lm import config as config_lib
from tpu_lm import metrics as metrics_lib
from tpu_lm import model as model_lib
from tpu_lm import decode, optim, preemption, sharding
from tpu_lm.data import pipeline, sources
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  nonfinite_streak: jax.Array  # consecutive steps skipped for a NaN/Inf, up to this one
  # Sums over the current logging window (steps since the last multiple of
  # log_every_steps). Kept in the state, so the loss logged after a resume
  # mid-window is the same mean an uninterrupted run logs.
  window_loss_sum: jax.Array
  window_nonfinite: jax.Array
  # Dynamic loss scaling (float16 compute; 1 and unused otherwise): the scale and
  # the finite steps since it last changed.
  loss_scale: jax.Array
  scale_good_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step needs besides the state and batch, read from the config once."""

  seed: int
  l1: float = 0.0
  log_every: int = 1
  accum_steps: int = 1
  dynamic_scale: bool = False
  scale_period: int = 2000
  logits_chunk: int = 0  # see batch_nats


def token_nats(logits_BxTxV, batch):
  """Summed cross-entropy over real (non-padding) targets, and their count."""
  weights_BxT = (batch["segment_ids"] > 0).astype(jnp.float32)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), batch["targets"])
  return (nll_BxT * weights_BxT).sum(), weights_BxT.sum()


def apply_model(model, params, batch, rngs=None, head=True):
  return model.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], rngs=rngs, head=head
  )


def batch_nats(model, params, batch, rngs=None, logits_chunk: int = 0):
  """Summed cross-entropy of the batch and its token count.

  logits_chunk > 0: the [B, T, V] logits are never whole. The sequence is cut into
  chunks of that many positions; a scan makes each chunk's logits, reduces them to
  a loss, and (jax.checkpoint) makes them again in the backward pass instead of
  keeping them: logits memory B x chunk x V instead of B x T x V, for one more
  unembedding matmul. Same loss and gradients as the whole (to float rounding).
  """
  if not logits_chunk or logits_chunk >= batch["inputs"].shape[1]:
    return token_nats(apply_model(model, params, batch, rngs), batch)
  hidden_BxTxD, w_DxV = apply_model(model, params, batch, rngs, head=False)
  b, t, d = hidden_BxTxD.shape
  n = t // logits_chunk

  def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]; each device keeps its rows
    return x.reshape(b, n, logits_chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_nats(w_DxV, xs):
    h_BxCxD, targets_BxC, segments_BxC = xs
    logits_BxCxV = nn.with_logical_constraint(h_BxCxD @ w_DxV, ("act_batch", "act_length", "act_vocab"))
    return token_nats(logits_BxCxV, {"targets": targets_BxC, "segment_ids": segments_BxC})

  def body(carry, xs):
    nats, count = chunk_nats(w_DxV, xs)
    return (carry[0] + nats, carry[1] + count), None

  xs = (chunks(hidden_BxTxD), chunks(batch["targets"]), chunks(batch["segment_ids"]))
  (nats, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), xs)
  return nats, count


def loss_and_grads(params, batch, rng, *, model, opts: StepOptions, loss_scale):
  """Mean token loss and its gradient over the global batch.

  With accum_steps = k the batch is cut into k microbatches (row i goes to
  microbatch i mod k, so each device keeps its own rows) and a lax.scan sums
  their token losses and gradients: one gradient-sized carry, activations of one
  microbatch at a time, and the same result as the whole batch at once. The
  gradient is of the scaled loss (loss_scale > 1 only for float16).
  """
  def nats_fn(params, micro, rng):
    nats, count = batch_nats(model, params, micro, {"dropout": rng}, opts.logits_chunk)
    return nats * loss_scale, (nats, count)

  if opts.accum_steps == 1:
    # Gradient of the mean loss directly (not of the sum, then divided): the
    # original formulation, bit-for-bit what earlier runs computed.
    def mean_fn(params):
      nats, count = batch_nats(model, params, batch, {"dropout": rng}, opts.logits_chunk)
      loss = nats / jnp.maximum(count, 1)
      return loss * loss_scale, loss

    (_, loss), grads = jax.value_and_grad(mean_fn, has_aux=True)(params)
  else:
    k = opts.accum_steps
    micro_batches = jax.tree.map(
        lambda x: nn.with_logical_constraint(
            x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), (None, "act_batch", "act_length")
        ),
        batch,
    )

    def body(carry, xs):
      grad_sum, nats_sum, count_sum = carry
      i, micro = xs
      (_, (nats, count)), grads = jax.value_and_grad(nats_fn, has_aux=True)(params, micro, jax.random.fold_in(rng, i))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (grad_sum, nats_sum + nats, count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, nats, count), _ = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(k), micro_batches)
    )
    count = jnp.maximum(count, 1)
    loss = nats / count
    grads = jax.tree.map(lambda g: g / count, grad_sum)
  if opts.l1:
    l1_grads = jax.grad(optim.l1_penalty)(params, opts.l1)
    grads = jax.tree.map(lambda g, l: g + l * loss_scale, grads, l1_grads)
  return loss, grads


def train_step(state: TrainState, batch, *, model, tx, opts: StepOptions):
  rng = jax.random.fold_in(jax.random.key(opts.seed), state.step)
  scale = state.loss_scale if opts.dynamic_scale else jnp.ones((), jnp.float32)
  loss, grads = loss_and_grads(state.params, batch, rng, model=model, opts=opts, loss_scale=scale)
  if opts.dynamic_scale:
    grads = jax.tree.map(lambda g: g / scale, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # Non-finite guard: a step whose loss, gradients or new parameters hold a NaN or
  # Inf changes nothing but the step counter (the batch is consumed), so no
  # non-finite state can ever exist, let alone be checkpointed. With float16 loss
  # scaling this is also the overflow skip.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  step = state.step + 1
  loss_sum = state.window_loss_sum + loss
  nonfinite = state.window_nonfinite + 1 - finite.astype(jnp.int32)
  steps_in_window = step - (step - 1) // opts.log_every * opts.log_every
  metrics = {"loss": loss_sum / steps_in_window, "grad_norm": grad_norm, "nonfinite_steps": nonfinite,
             "nonfinite_streak": streak, "loss_scale": scale}
  window_ends = step % opts.log_every == 0
  new_scale, good = state.loss_scale, state.scale_good_steps
  if opts.dynamic_scale:
    # Halve on overflow; double after a period of finite steps (and start counting anew).
    grow = finite & (good + 1 >= opts.scale_period)
    new_scale = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
    good = jnp.where(finite & ~grow, good + 1, 0)
  new_state = TrainState(
      step, keep(params, state.params), keep(opt_state, state.opt_state), streak,
      jnp.where(window_ends, 0.0, loss_sum), jnp.where(window_ends, 0, nonfinite), new_scale, good,
  )
  return new_state, metrics


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def eval_step(params, batch, *, model, logits_chunk: int = 0):
  return batch_nats(model, params, batch, logits_chunk=logits_chunk)


def init_boxed(rng, *, model, tx, seq_len: int, loss_scale: float = 1.0) -> TrainState:
  """The initial state with parameters still in their logical-partitioning boxes."""
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(rng, dummy, dummy, dummy)["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      zero, params, tx.init(params), zero, jnp.zeros((), jnp.float32), zero,
      jnp.asarray(loss_scale, jnp.float32), zero,
  )


class Setup:
  """Everything compiled for one config on one mesh: model, shardings, jitted steps."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rules = sharding.rules_tuple(config.mesh.rules)
    self.model_cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    deterministic = self.model_cfg.dropout_rate == 0
    self.train_model = model_lib.Transformer(self.model_cfg, deterministic=deterministic)
    self.eval_model = model_lib.Transformer(self.model_cfg, deterministic=True)
    self.tx = optim.make(config.optim, config.num_train_steps)
    self.lr = optim.schedule(config.optim, config.num_train_steps)
    o = config.optim
    dynamic_scale = o.loss_scale == "dynamic" or (o.loss_scale == "auto" and self.model_cfg.dtype == "float16")
    self.step_options = StepOptions(
        seed=config.seed, l1=o.l1_penalty, log_every=config.log_every_steps, accum_steps=o.grad_accum_steps,
        dynamic_scale=dynamic_scale, scale_period=o.loss_scale_period, logits_chunk=config.model.logits_chunk,
    )
    init = functools.partial(
        init_boxed, model=self.eval_model, tx=self.tx, seq_len=config.data.seq_len,
        loss_scale=o.loss_scale_init if dynamic_scale else 1.0,
    )
    key = jax.random.key(0)  # made outside the mesh context: the mesh may be a TPU slice described only (aot.py)
    with self.context():
      abstract = jax.eval_shape(init, key)
      self.state_shardings = sharding.logical_sharding(nn.get_partition_spec(abstract), mesh, self.rules)
      self.abstract_state = jax.eval_shape(lambda rng: nn.meta.unbox(init(rng)), key)
      sharding.check_divisible(self.abstract_state, self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
    self.init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_shardings)
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.train_model, tx=self.tx, opts=self.step_options),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, None),
        donate_argnums=0,
    )
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.eval_model, logits_chunk=config.model.logits_chunk),
        in_shardings=(self.state_shardings.params, self.batch_sharding),
    )

  def context(self):
    """Mesh and logical rules for tracing: the models' sharding constraints read them."""
    return _Both(jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

  def device_batch(self, local_batch: dict) -> dict:
    """This process's rows -> one global array per field, sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()
    }

  def flops_per_step(self) -> float:
    params = self.abstract_state.params
    n = model_lib.num_params(params, exclude_positions=True)
    d = self.config.data
    return metrics_lib.flops_per_token(n, self.model_cfg.num_layers, self.model_cfg.d_model, d.seq_len) * (
        d.global_batch_size * d.seq_len
    )


class _Both:
  def __init__(self, *managers):
    self._managers = managers

  def __enter__(self):
    for m in self._managers:
      m.__enter__()

  def __exit__(self, *exc):
    for m in reversed(self._managers):
      m.__exit__(*exc)


def evaluate(setup: Setup, params, corpus) -> dict:
  """Loss, perplexity and bits per byte over the whole validation split."""
  d = setup.config.data
  total, count = jnp.zeros(()), jnp.zeros(())
  for batch in pipeline.eval_batches(
      corpus.validation, seq_len=d.seq_len, global_batch=d.global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
  ):
    nats, n = setup.eval_step(params, setup.device_batch(batch))
    total, count = total + nats, count + n
  total, count = float(total), float(count)
  loss = total / max(count, 1)
  return {
      "eval_loss": loss,
      "eval_ppl": math.exp(min(loss, 50)),
      "eval_bpb": total / math.log(2) / max(corpus.validation.num_bytes, 1),
  }


def print_samples(setup: Setup, params, corpus) -> None:
  """Continuations of the first validation documents, by the KV-cache decoder."""
  s = setup.config.sample
  prompts = pipeline.first_tokens(corpus.validation, s.num_prompts, s.prompt_tokens)
  if not len(prompts):
    return
  mesh = setup.mesh.shape
  decoder = decode.Decoder(
      setup.model_cfg, params, eos_id=tokenizer_lib.EOS_ID, vocab_size=corpus.tokenizer.vocab_size,
      context=setup.context, batch_multiple=mesh["data"] * mesh["fsdp"],
  )
  samplings = [decode.Sampling(s.new_tokens, s.temperature, s.top_k, seed=setup.config.seed + i)
               for i in range(len(prompts))]
  tok = corpus.tokenizer
  for prompt, c in zip(prompts, decoder.generate([list(p) for p in prompts], samplings)):
    metrics_lib.console("--- sample ---\n" + tok.decode(prompt) + "\033[1m" + tok.decode(c.tokens) + "\033[0m")


def train_and_evaluate(config, workdir: str, watch: preemption.Watch | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final eval.

  `watch` (made first thing by `main`) turns SIGTERM/Ctrl-C into save-and-stop.
  """
  t_start = time.time()
  watch = watch or preemption.Watch()
  config_lib.validate(config)
  checkpoint_lib.check_writable(workdir)
  mesh = sharding.make_mesh(sharding.mesh_sizes(config.mesh))
  setup = Setup(config, mesh)
  d = config.data
  check_batch(config, mesh, jax.process_count())

  corpus = _prepare_corpus(d)
  metrics_lib.console(
      f"data: {d.dataset}, {len(corpus.train.tokens):,} train tokens, validation"
      f" {corpus.validation.num_bytes:,} bytes; tokenizer {corpus.tokenizer.name};"
      f" zlib -9 on the validation text: {corpus.zlib_bits_per_byte:.3f} bits/byte"
  )
  if jax.process_index() == 0:
    tokenizer_lib.save_for_run(corpus.tokenizer, workdir)
  train_iter = pipeline.train_iter(
      corpus.train, seq_len=d.seq_len, global_batch=d.global_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )

  ckpt = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", config.keep_checkpoints)
  state = _restore_or_init(setup, ckpt, train_iter)

  n_params = model_lib.num_params(setup.abstract_state.params)
  flops_per_step = setup.flops_per_step()
  peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device) * jax.device_count()
  metrics_lib.console(
      f"model: {n_params:,} parameters, {flops_per_step / (d.global_batch_size * d.seq_len):,.0f}"
      f" training FLOPs/token; mesh {dict(mesh.shape)} on {jax.device_count()}"
      f" {jax.devices()[0].platform} device(s)"
  )

  step = int(state.step)
  writer = metrics_lib.Writer(workdir, resume_step=step)
  with setup.context():
    t0 = time.time()
    compiled_step = setup.train_step.lower(state, setup.device_batch(_peek(train_iter))).compile()
    metrics_lib.console(f"compiled the train step in {time.time() - t0:.1f} s")
  window, t_window, steps_done = [], time.time(), 0
  t_train = time.time()
  saved_step = step if ckpt.latest_step() == step else None
  last_streak = None  # the previous step's non-finite streak, read one step late
  watch.enter_loop()
  try:
    while step < config.num_train_steps:
      state, m = compiled_step(state, setup.device_batch(next(train_iter)))
      step += 1
      steps_done += 1
      window.append(m)
      # Reading the previous step's counter waits for that step only: the step
      # just dispatched keeps the device busy meanwhile.
      if last_streak is not None and int(last_streak) >= config.max_consecutive_nonfinite:
        _diverged(ckpt, writer, int(last_streak), step - 1, config.max_consecutive_nonfinite)
      last_streak = m["nonfinite_streak"]
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        _log_train(setup, writer, step, jax.device_get(window), time.time() - t_window,  # host sync
                   eta_s=(config.num_train_steps - step) * (time.time() - t_train) / steps_done,
                   flops_per_step=flops_per_step, peak=peak)
        window, t_window = [], time.time()
      if watch.should_stop(step):
        if saved_step != step:
          ckpt.save(step, state, train_iter, config.to_dict())
        ckpt.close()  # waits until the checkpoint is committed
        writer.close()
        metrics_lib.console(
            f"stopped by {watch.reason} at step {step}: checkpoint saved in {ckpt.directory};"
            " run the same command again to resume")
        return {"stopped_at": step}
      if step % config.checkpoint_every_steps == 0 and step < config.num_train_steps:
        ckpt.save(step, state, train_iter, config.to_dict())
        saved_step = step
      if step % config.eval_every_steps == 0 and step < config.num_train_steps:
        _log_eval(setup, state, corpus, writer, step)
        t_window = time.time()  # eval time is not training throughput
    if last_streak is not None and int(last_streak) >= config.max_consecutive_nonfinite:
      _diverged(ckpt, writer, int(last_streak), step, config.max_consecutive_nonfinite)
    if saved_step != step:
      ckpt.save(step, state, train_iter, config.to_dict())
    result = _log_eval(setup, state, corpus, writer, step)
    if watch.reason is None:  # a signal during the final eval: the checkpoint is all that matters
      print_samples(setup, state.params, corpus)
    ckpt.close()
  finally:
    watch.close()
  writer.close()
  metrics_lib.console(f"done: step {step}, total wall time {time.time() - t_start:.0f} s; workdir {workdir}")
  return result


def check_batch(config, mesh, process_count: int) -> None:
  """UserError unless the global batch splits evenly over processes (each loads its
  own rows), data-parallel devices and, within each device, the microbatches of
  gradient accumulation."""
  d, k = config.data, config.optim.grad_accum_steps
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if d.global_batch_size % math.lcm(process_count, dp * k):
    config_lib.fail(
        "data.global_batch_size", d.global_batch_size,
        f"it must be divisible by the processes ({process_count}) and by the data-parallel"
        f" devices (mesh data*fsdp = {dp})" + (f" times optim.grad_accum_steps ({k})" if k > 1 else ""),
    )


def _diverged(ckpt, writer, streak: int, step: int, limit: int) -> None:
  ckpt.close()
  writer.close()
  raise UserError(
      f"training diverged: the last {streak} steps (to step {step}) had a NaN or Inf loss, gradient or"
      f" update and were skipped (max_consecutive_nonfinite={limit}); checkpoints only ever hold finite"
      f" states (newest: step {ckpt.latest_step()}). Lower optim.learning_rate or set optim.grad_clip_norm,"
      " then rerun to resume from it."
  )


def _prepare_corpus(data) -> sources.Corpus:
  """Process 0 builds the dataset and tokenizer; the others then read its cache."""
  if jax.process_index() == 0:
    corpus = sources.prepare(data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tpu_lm data prepared")
    if jax.process_index() != 0:
      corpus = sources.prepare(data)
  return corpus


def _restore_or_init(setup: Setup, ckpt, train_iter) -> TrainState:
  """The newest checkpoint's state (and data position), else a freshly initialised state."""
  latest = ckpt.latest_step()
  if latest is None:
    metrics_lib.console(f"starting from scratch; checkpoints go to {ckpt.directory}")
    return setup.init(jax.random.key(setup.config.seed))
  abstract = checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings)
  state = ckpt.restore(latest, abstract, train_iter)
  metrics_lib.console(f"resuming from the checkpoint at step {latest} in {ckpt.directory}")
  if latest >= setup.config.num_train_steps:
    metrics_lib.console(
        f"already trained to num_train_steps={setup.config.num_train_steps}: evaluating and sampling"
        " only (raise --config.num_train_steps to train further)"
    )
  return state


def _log_train(setup, writer, step, window, elapsed, *, eta_s, flops_per_step, peak) -> None:
  d = setup.config.data
  loss = float(window[-1]["loss"])  # the mean over the logging window, kept in the train state
  sec_per_step = elapsed / len(window)
  record = {
      "loss": loss, "ppl": math.exp(min(loss, 50)), "lr": float(setup.lr(step - 1)),
      "grad_norm": float(window[-1]["grad_norm"]),
      "tokens_per_s": d.global_batch_size * d.seq_len / sec_per_step, "step_time_s": sec_per_step,
      "nonfinite_steps": int(window[-1]["nonfinite_steps"]),
  }
  if setup.step_options.dynamic_scale:
    record["loss_scale"] = float(window[-1]["loss_scale"])
  mfu = "n/a (unknown peak)"
  if peak:
    record["mfu"] = flops_per_step / sec_per_step / peak
    mfu = f"{100 * record['mfu']:.1f}%"
  metrics_lib.console(
      f"step {step:>6}/{setup.config.num_train_steps}  loss {loss:.4f}  ppl {record['ppl']:.2f}"
      f"  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
      f"  MFU {mfu}  ETA {metrics_lib.format_seconds(eta_s)}"
      + (f"  loss scale {record['loss_scale']:g}" if "loss_scale" in record else "")
      + (f"  SKIPPED {record['nonfinite_steps']} non-finite step(s)" if record["nonfinite_steps"] else "")
  )
  writer.write(step, record)


def _log_eval(setup, state, corpus, writer, step) -> dict:
  t0 = time.time()
  with setup.context():
    result = evaluate(setup, state.params, corpus)
  metrics_lib.console(
      f"eval at step {step}: loss {result['eval_loss']:.4f}  ppl {result['eval_ppl']:.2f}"
      f"  bits/byte {result['eval_bpb']:.4f}  (zlib -9: {corpus.zlib_bits_per_byte:.4f});"
      f" whole validation split in {time.time() - t0:.1f} s"
  )
  writer.write(step, result)
  return result


def _peek(it):
  """The next batch, without advancing the iterator (to compile for its shapes)."""
  state = it.get_state()
  batch = next(it)
  it.set_state(state)
  return batch
