"""A trained run directory read back for inference: its config, newest
parameters and tokenizer, assembled into a `decode.Decoder`.

Everything comes from the run directory itself (the config is saved in every
checkpoint, the tokenizer next to them), so `generate` and `serve` need only
`--workdir`. Nothing is created, changed or deleted in it.
"""

import dataclasses
import os

import jax
import ml_collections

from tpu_lm import checkpoint as checkpoint_lib
from tpu_lm import config as config_lib
from tpu_lm import decode, sharding, train
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError


@dataclasses.dataclass
class Run:
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  decoder: decode.Decoder

  def encode_prompt(self, text: str) -> list[int]:
    """[BOS] + tokens: prompts start the way every training document did."""
    return [tokenizer_lib.BOS_ID, *(int(t) for t in self.tokenizer.encode_batch([text])[0])]


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
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=1, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"{ckpt_dir} holds no complete checkpoint yet: let the run save one first.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"there is no checkpoint at step {step} in {ckpt_dir}: it has steps {sorted(steps)}.")
  tokenizer = tokenizer_lib.load_for_run(workdir)
  config = ml_collections.ConfigDict(ckpt.restore_config(step))
  config_lib.validate(config)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor_parallel}, devices)
  setup = train.Setup(config, mesh)
  abstract = checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings)
  params = ckpt.restore_state(step, abstract).params
  decoder = decode.Decoder(
      setup.model_cfg, params, eos_id=tokenizer_lib.EOS_ID, vocab_size=tokenizer.vocab_size,
      context=setup.context, batch_multiple=mesh.shape["data"],
  )
  jax.block_until_ready(params)
  return Run(workdir, step, config, tokenizer, decoder)
