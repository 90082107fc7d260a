"""Evaluation over the validation split, and samples from the model after training."""

import jax
import numpy as np

from tpu_lm.data import pipeline
from tpu_lm.errors import UserError
from tpu_lm.inference import decode
from tpu_lm.progress import Progress
from tpu_lm.training import metrics as metrics_lib


def evaluate(setup, params, corpus, eval_step=None, wrap=None) -> dict:
  """The task's eval metrics over the validation split (or eval_max_batches batches
  of its documents in a fixed seeded order, if set); `eval_step` (params, batch) ->
  sums, default setup's (another model over the same batches: a quantized one, which
  `wrap(model)` gives the decoder that reads held-out images)."""
  eval_step = eval_step or setup.eval_step
  d = setup.config.data
  if len(corpus.validation) == 0:
    raise UserError(f"the validation split {d.eval_split!r} of {d.dataset!r} is empty: set data.eval_split to another split.")
  sums = None
  progress = Progress("eval", every_s=15.0, enabled=jax.process_index() == 0)
  for batch, done_here in pipeline.eval_batches(
      corpus.validation, seq_len=d.seq_len, global_batch=d.global_batch_size, max_batches=setup.config.eval_max_batches,
      process_index=jax.process_index(), process_count=jax.process_count(), on_progress=progress.update,
  ):
    out = eval_step(params, setup.device_batch(batch))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    if _everywhere(done_here):  # every process runs the same number of eval steps
      break
  result = setup.task.eval_metrics(jax.device_get(sums))
  scored = result.get("eval_tokens", result.get("eval_examples"))
  if not scored:  # a loss of 0 over nothing is no score: never report it as one
    raise UserError(f"the eval scored nothing: the validation split {d.eval_split!r} of {d.dataset!r} has"
                    f" {len(corpus.validation)} documents but no {'tokens' if 'eval_tokens' in result else 'examples'}"
                    " to score; set data.eval_split to a split with text.")
  if getattr(setup.task, "reads_images", False):
    result.update(read_images(setup, params, corpus, wrap))
  return result


def decodable(setup, params):
  """The parameters a KV-cache decoder runs as training's eval model does: a LoRA run's
  adapters merged into their kernels (the plain model the decoder builds has no adapters
  and would silently skip them)."""
  lora_cfg = setup.config.lora
  if not lora_cfg.rank:
    return params
  from tpu_lm.model import lora

  return lora.merge(params, rank=lora_cfg.rank, alpha=lora_cfg.alpha)


def decoder_for(setup, params, tok, wrap=None) -> decode.Decoder:
  """A KV-cache decoder of the parameters training holds, on its mesh (`decodable`)."""
  mesh = setup.mesh.shape
  return decode.Decoder(setup.model_cfg, decodable(setup, params), eos_id=tok.eos_id, pad_id=tok.pad_id,
                        vocab_size=tok.vocab_size, context=setup.context, batch_multiple=mesh["data"] * mesh["fsdp"],
                        wrap=wrap)


def read_images(setup, params, corpus, wrap=None, show: int = 3) -> dict:
  """A reading objective's held-out examples read greedily from their images alone:
  character error rate and exact lines (tasks/reading.py); the first `show` printed.
  `wrap`: the model that runs `params` when it is not the plain one (quantized)."""
  from tpu_lm.tasks import reading

  task, tok = setup.task, corpus.tokenizer
  n = min(task.eval_examples, len(corpus.validation))
  if not n:
    return {}
  if wrap is not None:  # another model, read once (compression's quantized copy)
    decoder = decoder_for(setup, params, tok, wrap)
  elif setup.reader is None:  # one compiled decoder per run: each eval swaps the parameters in
    decoder = setup.reader = decoder_for(setup, params, tok)
  else:
    decoder = setup.reader
    decoder.set_params(decodable(setup, params))
  max_new = setup.config.data.seq_len - task.image_slots - 1
  read, references = task.transcribe(decoder, tok, corpus.validation.source.get(list(range(n))), max_new)
  if jax.process_index() == 0:
    for r, ref in list(zip(read, references))[:show]:
      metrics_lib.console(f"--- read ---\n  truth: {ref}\n  read:  {r}")
  return reading.reading_scores(read, references)


def _everywhere(flag: bool) -> bool:
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(multihost_utils.process_allgather(np.asarray(bool(flag))).all())


def print_samples(setup, params, corpus) -> None:
  """Continuations of the first validation documents, by the KV-cache decoder."""
  s = setup.config.sample
  prompts = pipeline.first_tokens(corpus.validation, s.num_prompts, s.prompt_tokens)
  if not len(prompts):
    return
  tok = corpus.tokenizer
  decoder = decoder_for(setup, params, tok)
  samplings = [decode.Sampling(s.new_tokens, s.temperature, s.top_k, seed=setup.config.seed + i)
               for i in range(len(prompts))]
  for prompt, c in zip(prompts, decoder.generate([list(p) for p in prompts], samplings)):
    metrics_lib.console("--- sample ---\n" + tok.decode(prompt) + "\033[1m" + tok.decode(c.tokens) + "\033[0m")
