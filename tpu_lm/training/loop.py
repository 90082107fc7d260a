"""The training loop: data, restore or init, steps, logging, eval, checkpoints.

The steps are pure functions of their arguments (step.py); the loop owns
everything with side effects (data, checkpoints, logging). The dropout key is
derived from the seed and the step, and the data order from the seed and the
iterator position, so a run resumed from a checkpoint continues exactly as if it
had never stopped.
"""

import hashlib
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from tpu_lm import storage, tasks
from tpu_lm.config import checks, defaults
from tpu_lm.data import pipeline, sources
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.model import params as params_lib
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import checkpoint as checkpoint_lib
from tpu_lm.training import metrics as metrics_lib
from tpu_lm.training import harness_eval, init_from, optim, preemption, prune
from tpu_lm.training.evaluate import evaluate, print_samples
from tpu_lm.training.setup import Setup, check_batch
from tpu_lm.training.state import TrainState


def train_and_evaluate(config, workdir: str, watch: preemption.Watch | None = None, on_eval=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final eval.

  `watch` (made first thing by the command) turns SIGTERM/Ctrl-C into save-and-stop.
  `on_eval(step, result) -> bool`, if given, sees every intermediate eval; True stops
  training there (a sweep's pruner): the step is saved and its eval returned, with
  "stopped_early" set to the step.
  """
  t_start = time.time()
  watch = watch or preemption.Watch()
  checks.validate(config)  # the config, then where it runs
  harness = harness_eval.Harness.prepare(config)  # its tasks found before any work
  checkpoint_lib.check_writable(workdir)
  _check_shared_workdir(workdir)
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes(config.mesh))
  check_batch(config, mesh, jax.process_count())
  objective, corpus = _objective_and_data(config, _source_tokenizer(config))
  setup = Setup(config, mesh, objective)  # the model, its optimizer and the compiled steps
  if config.init_from:
    init_from.check(setup, config.init_from)
  _check_vocabulary(config, corpus.tokenizer)
  ckpt = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", config.keep_checkpoints)
  _check_same_run(config, setup, ckpt, corpus.tokenizer, workdir)  # before anything in workdir is written
  if jax.process_index() == 0:
    tokenizer_lib.save_for_run(corpus.tokenizer, workdir)
  train_iter, private = _train_iter(setup, corpus, ckpt)
  state = _restore_or_init(setup, ckpt, train_iter)
  return _train(setup, state, train_iter, private, corpus, ckpt, workdir, watch, on_eval, t_start, harness)


def _source_tokenizer(config):
  """The tokenizer the run must speak, when another run decides it: fine-tuning speaks
  the source run's (init_from), whatever data.tokenizer says; a distilled student, its
  teacher's. None: the data's."""
  tokenizer = init_from.source_tokenizer(config.init_from) if config.init_from else None
  if config.distill.teacher:
    teacher_tok = init_from.source_tokenizer(config.distill.teacher, "distill.teacher")
    if tokenizer is not None and tokenizer.name != teacher_tok.name:
      raise UserError(f"init_from {config.init_from} speaks tokenizer {tokenizer.name} and distill.teacher"
                      f" {config.distill.teacher} speaks {teacher_tok.name}: teacher and student must share one.")
    tokenizer = teacher_tok
  return tokenizer


def _train_iter(setup, corpus, ckpt):
  """(the training data iterator, the private run or None): Poisson-sampled examples
  and the private step under DP (tpu_lm/privacy), else the checkpointable stream."""
  config, d = setup.config, setup.config.data
  if not config.privacy.dp:
    return pipeline.train_iter(
        corpus.train, seq_len=d.seq_len, global_batch=d.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), block_docs=d.shuffle_block_docs,
    ), None
  from tpu_lm.privacy import run as private_lib

  latest = ckpt.latest_step()
  resumed = (latest, ckpt.saved_item(latest, "data")) if latest is not None else None
  private = private_lib.prepare(setup, corpus, metrics_lib.console, jax.process_index(), jax.process_count(),
                                resumed)
  return private, private


def _train(setup, state, train_iter, private, corpus, ckpt, workdir, watch, on_eval, t_start, harness) -> dict:
  """The loop: steps, logs, evals, checkpoints, until num_train_steps or a stop."""
  config, d = setup.config, setup.config.data
  n_params = params_lib.num_params(setup.abstract_state.params)
  flops_per_step = setup.flops_per_step()
  peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device) * jax.device_count()
  metrics_lib.console(
      f"model: {n_params:,} parameters, {flops_per_step / (d.global_batch_size * d.seq_len):,.0f}"
      f" training FLOPs/token; mesh {dict(setup.mesh.shape)} on {jax.device_count()}"
      f" {jax.devices()[0].platform} device(s); {setup.trainable_summary()}"
  )

  step = int(state.step)
  writer = metrics_lib.Writer(workdir, resume_step=step)
  with setup.context():
    t0 = time.time()
    compiled_step = setup.train_step.lower(state, setup.device_batch(train_iter.peek())).compile()
    metrics_lib.console(f"compiled the train step in {time.time() - t0:.1f} s")
  window, timer, steps_done = [], metrics_lib.StepTimer(), 0
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
      timer.tick()
      # Reading the previous step's counter waits for that step only: the step
      # just dispatched keeps the device busy meanwhile.
      if last_streak is not None and int(last_streak) >= config.max_consecutive_nonfinite:
        _diverged(ckpt, writer, int(last_streak), step - 1, config.max_consecutive_nonfinite)
      last_streak = m["nonfinite_streak"]
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        _log_train(setup, writer, step, jax.device_get(window), timer.seconds_per_step(),  # host sync
                   eta_s=(config.num_train_steps - step) * (time.time() - t_train) / steps_done,
                   flops_per_step=flops_per_step, peak=peak, extra=private.metrics(step) if private else None)
        window = []
        timer.restart()
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
        result = _log_eval(setup, state, corpus, writer, step, harness, workdir)
        timer.restart()  # eval time is not training throughput (nor are the steps timed before it)
        if on_eval is not None and on_eval(step, result):
          if saved_step != step:
            ckpt.save(step, state, train_iter, config.to_dict())
          ckpt.close()
          writer.close()
          metrics_lib.console(f"stopped early at step {step} (its eval was not promising)")
          return {**result, "stopped_early": step}
    if last_streak is not None and int(last_streak) >= config.max_consecutive_nonfinite:
      _diverged(ckpt, writer, int(last_streak), step, config.max_consecutive_nonfinite)
    if saved_step != step:
      ckpt.save(step, state, train_iter, config.to_dict())
    # After a signal the grace period is for the checkpoint, not for minutes of harness tasks.
    result = _log_eval(setup, state, corpus, writer, step, harness if watch.reason is None else None, workdir,
                       final=True)
    if watch.reason is None and setup.task.generates:  # after a signal the checkpoint is all that matters
      print_samples(setup, optim.eval_params(state.opt_state, state.params), corpus)
    ckpt.close()
  finally:
    watch.close()
    train_iter.close()
  writer.close()
  metrics_lib.console(f"done: step {step}, total wall time {time.time() - t_start:.0f} s; workdir {workdir}")
  return result


def _diverged(ckpt, writer, streak: int, step: int, limit: int) -> None:
  ckpt.close()
  writer.close()
  raise UserError(
      f"training diverged: the last {streak} steps (to step {step}) had a NaN or Inf loss, gradient or"
      f" update and were skipped (max_consecutive_nonfinite={limit}); checkpoints only ever hold finite"
      f" states (newest: step {ckpt.latest_step()}). Lower optim.learning_rate or set optim.grad_clip_norm,"
      " then rerun to resume from it."
  )


def _objective_and_data(config, tokenizer):
  """(the objective, the corpus): the dataset's splits, the objective (a classifier
  takes its classes from them), the tokenizer (given, or the data's) and the splits as
  the objective reads them. Process 0 builds the dataset and tokenizer; the others
  then read its cache (on shared storage) or build the same ones from the same seeded
  sample (on their own disks). Every process must end with the same tokenizer: checked."""

  def prepare():
    splits = sources.open_splits(config.data)
    objective = tasks.from_config(config, splits.class_names)
    return objective, sources.prepare(config.data, splits, objective, tokenizer)

  if jax.process_index() == 0:
    objective, corpus = prepare()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tpu_lm data prepared")
    if jax.process_index() != 0:
      objective, corpus = prepare()
    digest = np.frombuffer(hashlib.sha256(corpus.tokenizer.name.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    if not (every == every[0]).all():
      raise UserError(
          "the processes built different tokenizers from data.dataset (their data differs): give every host the"
          " same data, or one tokenizer file through data.tokenizer_path.")
  d = config.data
  metrics_lib.console(
      f"data: {d.dataset}, {len(corpus.train):,} train and {len(corpus.validation):,} validation documents"
      f" (tokenized as read); tokenizer {corpus.tokenizer.name}; objective {objective.name}"
      + (f"; zlib -9 on the validation text: {corpus.zlib_bits_per_byte:.3f} bits/byte"
         if corpus.zlib_bits_per_byte else f"; classes {', '.join(corpus.class_names)}" if corpus.class_names else "")
  )
  return objective, corpus


def _check_shared_workdir(workdir: str) -> None:
  """Several processes write one checkpoint: the workdir must be the same storage for
  all of them (a bucket, or a shared file system), not each host's own disk."""
  if jax.process_count() == 1:
    return
  marker = os.path.join(workdir, ".tpu_lm_shared_check")
  if jax.process_index() == 0:
    with storage.open(marker, "w") as f:
      f.write(str(os.getpid()))
  multihost_utils.sync_global_devices("tpu_lm workdir marker")
  seen = np.asarray(multihost_utils.process_allgather(np.asarray(storage.exists(marker))))
  multihost_utils.sync_global_devices("tpu_lm workdir checked")
  if jax.process_index() == 0:
    storage.remove(marker)
  if not seen.all():
    raise UserError(
        f"--workdir={workdir} is not shared: process(es) {list(np.flatnonzero(~seen))} cannot see what process 0"
        " writes there. Several hosts need one workdir on shared storage (a gs:// bucket or a network file system).")


# What makes a run's data: resuming with another value would continue another run's
# stream positions on other rows. (The tokenizer is compared as itself; the
# architecture and optimizer by the checkpoint's shapes.)
_RECIPE = ("task.kind", "data.dataset", "data.path", "data.train_split", "data.text_key", "data.label_key",
           "data.max_documents", "data.seq_len", "data.chat_template")


def _check_same_run(config, setup: Setup, ckpt, tokenizer, workdir: str) -> None:
  """UserError, before anything in `workdir` is written, unless its newest checkpoint
  was trained with this config's tokenizer, data recipe and parameter shapes."""
  latest = ckpt.latest_step()
  if latest is None:  # nothing trained there yet: a start from scratch
    return
  ckpt.check_resumable(latest)
  new_workdir = "resume with the config it was trained with, or use a new --workdir"
  if storage.exists(os.path.join(workdir, tokenizer_lib.RUN_FILE)):
    theirs = tokenizer_lib.load_for_run(workdir)
    if theirs.name != tokenizer.name:
      raise UserError(f"{workdir} holds a run trained with tokenizer {theirs.name}, and this config makes"
                      f" {tokenizer.name} (data.tokenizer={config.data.tokenizer!r}): {new_workdir}.")
  saved = defaults.complete(ckpt.saved_item(latest, "config"))
  for field in _RECIPE:
    section, name = field.split(".")
    was, now = saved[section][name], config[section][name]
    if field == "data.path":  # the same files, however the path was written
      was, now = (os.path.abspath(os.path.expanduser(p)) if p else p for p in (was, now))
    if field == "task.kind":  # the objective, however it was named (tasks.name_of)
      was, now = tasks.name_of(saved), tasks.name_of(config)
    if was != now:
      raise UserError(f"{workdir} holds a run trained with {field}={was!r}, and this config has {now!r}:"
                      f" {new_workdir}.")
  ckpt.check_structure(latest, setup.abstract_state)  # another architecture or optimizer; parameters only


def _check_vocabulary(config, tok) -> None:
  """The model's table must hold every id the tokenizer makes."""
  from tpu_lm.config import derived

  have = derived.tokenizer_vocab_size(config)
  if tok.vocab_size > have:
    raise UserError(
        f"the tokenizer {tok.name} has {tok.vocab_size} ids but data.vocab_size is {have}: set"
        f" data.vocab_size={tok.vocab_size}.")


def _restore_or_init(setup: Setup, ckpt, train_iter) -> TrainState:
  """The newest checkpoint's state (and data position), else a freshly initialised state."""
  latest = ckpt.latest_step()
  if latest is None:
    state = setup.init(jax.random.key(setup.config.seed))
    if setup.config.init_from:  # resuming (below) wins: a restarted fine-tune continues
      with setup.context():
        state = state.replace(params=init_from.load(setup, setup.config.init_from, state.params))
      metrics_lib.console(f"fine-tuning from {setup.config.init_from}; checkpoints go to {ckpt.directory}")
    else:
      metrics_lib.console(f"starting from scratch; checkpoints go to {ckpt.directory}")
    return state
  abstract = checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings)
  state = ckpt.restore(latest, abstract, train_iter)
  metrics_lib.console(f"resuming from the checkpoint at step {latest} in {ckpt.directory}")
  if latest >= setup.config.num_train_steps:
    metrics_lib.console(
        f"already trained to num_train_steps={setup.config.num_train_steps}: evaluating and sampling"
        " only (raise --config.num_train_steps to train further)"
    )
  return state


# The step's own metrics; the rest come from the task.
_STEP_METRICS = ("loss", "step_loss", "grad_norm", "nonfinite_steps", "nonfinite_streak", "loss_scale", "lr")


def _log_train(setup, writer, step, window, sec_per_step, *, eta_s, flops_per_step, peak, extra=None) -> None:
  d = setup.config.data
  loss = float(window[-1]["loss"])  # the mean over the logging window, kept in the train state
  record = {
      "loss": loss, "ppl": math.exp(min(loss, 50)), "lr": float(window[-1]["lr"]),
      "grad_norm": float(window[-1]["grad_norm"]),
      "tokens_per_s": d.global_batch_size * d.seq_len / sec_per_step, "step_time_s": sec_per_step,
      "nonfinite_steps": int(window[-1]["nonfinite_steps"]),
  }
  # Whatever else the task reports (e.g. a classifier's accuracy), as is.
  record.update({k: float(v) for k, v in window[-1].items() if k not in _STEP_METRICS})
  if "ce" in record:  # distillation: the loss is the mixed objective; perplexity is the cross-entropy's
    record["ppl"] = math.exp(min(record["ce"], 50))
  if setup.step_options.dynamic_scale:
    record["loss_scale"] = float(window[-1]["loss_scale"])
  record.update(extra or {})  # a private run's epsilon so far
  mfu = "n/a (unknown peak)"
  if peak:
    record["mfu"] = flops_per_step / sec_per_step / peak
    mfu = f"{100 * record['mfu']:.1f}%"
  task_shown = "".join(f"  {k} {record[k]:.4f}" for k in record if k in window[-1] and k not in _STEP_METRICS)
  metrics_lib.console(
      f"step {step:>6}/{setup.config.num_train_steps}  loss {loss:.4f}  ppl {record['ppl']:.2f}{task_shown}"
      f"  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
      f"  MFU {mfu}  ETA {metrics_lib.format_seconds(eta_s)}"
      + (f"  loss scale {record['loss_scale']:g}" if "loss_scale" in record else "")
      + (f"  epsilon {record['epsilon']:.3f} (delta {record['delta']:g})" if "epsilon" in record else "")
      + (f"  SKIPPED {record['nonfinite_steps']} non-finite step(s)" if record["nonfinite_steps"] else "")
  )
  writer.write(step, record)


_EVAL_NAMES = {"eval_loss": "loss", "eval_ppl": "ppl", "eval_bpb": "bits/byte"}


def _scored(result: dict) -> str:
  """'1,234 tokens of 12 documents' (or '56 examples'): what an eval scored."""
  if "eval_tokens" in result:
    return f"{result['eval_tokens']:,} tokens of {result['eval_documents']:,} documents"
  return f"{result.get('eval_examples', 0):,} examples"


def _log_eval(setup, state, corpus, writer, step, harness=None, workdir="", final=False) -> dict:
  t0 = time.time()
  params = optim.eval_params(state.opt_state, state.params)  # schedule-free: its average
  with setup.context():
    result = evaluate(setup, params, corpus)
  shown = "  ".join(f"{_EVAL_NAMES.get(k, k.removeprefix('eval_'))} {v:.4f}" for k, v in result.items()
                    if isinstance(v, float))
  zlib = f"  (zlib -9: {corpus.zlib_bits_per_byte:.4f})" if corpus.zlib_bits_per_byte else ""
  metrics_lib.console(
      f"eval at step {step}: {shown}{zlib}; validation: {_scored(result)}"
      + (f" (a seeded sample of {setup.config.eval_max_batches} batches)" if setup.config.eval_max_batches
         else " (whole split)")
      + f" in {time.time() - t0:.1f} s"
      + metrics_lib.classification_table(result))
  if harness and harness.due(step, final):  # its scoring and decoding enter the mesh themselves
    result = {**result, **harness.run(setup, params, corpus.tokenizer, workdir, step)}
  writer.write(step, result)
  if setup.prune.active:  # what the masks achieved, per layer and overall
    report = prune.report(jax.device_get(state.params), setup.prune)
    layers = ", ".join(f"{k.removesuffix('/kernel')} {v:.0%}" for k, v in report["per_layer"].items())
    metrics_lib.console(f"sparsity at step {step}: {report['targets']:.1%} of the pruned kernels"
                        f" ({report['overall']:.1%} of all parameters): {layers}")
    writer.write(step, {"sparsity": report["targets"], "sparsity_overall": report["overall"]})
  return result
