"""A run directory, read for looking inside: the float model (one device, per-layer
parameters, the reference attention path available) and its tokenizer."""

import dataclasses

import jax

from tpu_lm import storage, tasks
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.model import params as params_lib
from tpu_lm.model.transformer import Transformer
from tpu_lm.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Model:
  workdir: str
  step: int
  model: Transformer
  params: dict
  tokenizer: object

  def encode(self, text: str) -> list[int]:
    """`text` as generate and serve prompt the run (tokenizer.encode_prompt)."""
    return tokenizer_lib.encode_prompt(self.tokenizer, text)

  def pieces(self, tokens) -> list[str]:
    """Each token as text (BOS as <bos>), for axis labels."""
    return ["<bos>" if t == self.tokenizer.bos_id else self.tokenizer.decode([t]) for t in tokens]


def load(workdir: str, step: int | None = None) -> Model:
  workdir = storage.absolute(workdir)
  step = run_dir.resolve_step(workdir, step)
  config = run_dir.read_config(workdir, step)
  objective = tasks.from_config(config)
  if not objective.generates:
    raise UserError(f"{workdir} is a {objective.name} run: inspect reads language models (the logit lens needs"
                    " the unembedding).")
  if run_dir.quantized(config):
    raise UserError(f"{workdir} holds quantized weights: inspect the float run it was compressed from.")
  with config.unlocked():
    config.model.dtype = "float32"  # gradients and probabilities in full precision
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params, model_cfg, _ = run_dir.read_model(workdir, step, config, mesh, "float32")
  if model_cfg.scan_layers:  # the probes sit between blocks: per-layer parameters
    params = params_lib.unstack_layers(params)
  model_cfg = dataclasses.replace(model_cfg, scan_layers=False, remat="none", dropout_rate=0.0)
  return Model(workdir, step, Transformer(model_cfg), jax.device_get(params), tokenizer_lib.load_for_run(workdir))
