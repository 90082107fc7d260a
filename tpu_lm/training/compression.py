"""Post-training compression of a run directory: one-shot pruning and/or weight
quantization, written as a new run directory that generate and serve read, with the
validation eval before and after (the run's objective's: bits/byte for a language
model, bits per masked token for an encoder, accuracy for a classifier or tagger).

Quantization-aware training and gradual pruning are training configs
(`quant.qat`, `prune.*`); their runs come here to be written quantized.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from tpu_lm import storage
from tpu_lm.data import sources
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.model import quant
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import evaluate, prune
from tpu_lm.training.setup import Setup
from tpu_lm.training.step import eval_step

REPORT_FILE = "compression.json"


@dataclasses.dataclass
class Result:
  source: dict  # eval metrics of the source run
  compressed: dict  # and of the written one
  sparsity: dict  # prune.report of the written parameters
  bits_per_weight: float
  bytes_on_disk: tuple[int, int]  # the parameters in float32; the written checkpoint directory


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def compress(src: str, out: str, *, quant_spec: quant.Spec, prune_spec: prune.Spec, step: int | None = None,
             eval_max_batches: int = 0) -> Result:
  src = storage.absolute(src)
  run_dir.check_new(out, "--out")  # before the evaluations, which take minutes on a real model
  step = run_dir.resolve_step(src, step)
  config = run_dir.read_config(src, step)
  if run_dir.quantized(config):
    raise UserError(f"{src} is quantized already ({config.quant.weight_qtype}): compress the run it came from.")
  if config.model.scan_layers:
    raise UserError(f"{src} was trained with model.scan_layers=True: compression names per-layer kernels;"
                    " fine-tune it with --config.model.scan_layers=False first.")
  tokenizer = tokenizer_lib.load_for_run(src)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params, _, _ = run_dir.read_model(src, step, config, mesh, dtype="float32")
  config.eval_max_batches = eval_max_batches or config.eval_max_batches
  plain = ml_collections.ConfigDict(config.to_dict())
  # The parameters read are the plain model's (adapters merged); nothing trains here.
  plain.lora.rank, plain.quant.qat, plain.distill.teacher = 0, False, ""
  plain.prune.update(sparsity=0.0, n_m="")
  setup = Setup(plain, mesh)
  corpus = sources.prepare(plain.data, sources.open_splits(plain.data), setup.task, tokenizer)
  before = evaluate.evaluate(setup, params, corpus)
  float_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  if prune_spec.active:
    params = jax.jit(lambda p: prune.prune(p, prune_spec))(params)
  sparsity = prune.report(params, prune_spec)
  written = plain
  written.prune.update(sparsity=prune_spec.sparsity, n_m=prune_spec.n_m)  # a record: the zeros are in the weights
  bits = 32.0
  if quant_spec.weight_qtype:
    qmodel = quant.ptq_model(setup.eval_model, quant_spec)
    params = quant.quantize(params, qmodel, quant_spec)
    bits = quant.bits_per_weight(params)
    written.quant.update(weight_qtype=quant_spec.weight_qtype, tile_size=quant_spec.tile_size,
                         act_qtype=quant_spec.act_qtype, targets=quant_spec.targets, qat=False)
    step_fn = jax.jit(lambda p, b: eval_step(p, b, model=qmodel, task=setup.task))
    after = evaluate.evaluate(setup, params, corpus, eval_step=step_fn,
                              wrap=lambda model: quant.ptq_model(model, quant_spec))
    saved = quant.saved_form(params)
  else:
    after = evaluate.evaluate(setup, params, corpus)
    saved = jax.tree.map(np.asarray, params)
  written.init_from = ""
  run_dir.write(out, written, saved, tokenizer, step=step)
  out = storage.absolute(out)
  result = Result(before, after, sparsity, bits, (float_bytes, dir_bytes(os.path.join(out, "checkpoints", str(step)))))
  with open(os.path.join(out, REPORT_FILE), "w") as f:
    json.dump({"source": src, "step": step, **dataclasses.asdict(result)}, f, indent=1)
  return result
