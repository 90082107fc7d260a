"""Fine-tune a run directory (trained here, or converted by python -m tpu_lm.convert):

  python -m tpu_lm.main --config=configs/finetune.py:RUN --workdir=NEW \
      --config.data.dataset=text_files --config.data.path='/my/domain/**/*.py'

The part after the colon is the source run. Its model section and tokenizer are
copied, so the architecture matches by construction; the schedule is a short
fine-tune (a tenth of the base learning rate, 300 steps). Then choose how much
trains:
  full (default)  every parameter
  frozen layers   --config.optim.freeze='("embed/.*", "layers_0/.*")'
  LoRA            --config.lora.rank=8 [--config.lora.targets='.*attn/(query|value)']
Instruction tuning: --config.data.dataset=instructions --config.data.path=pairs.jsonl
Classification:   --config.task.kind=classification --config.data.dataset=stdlib_functions
                  (an encoder run, task.kind="mlm", is classified from its first token,
                  attending both ways: task.attention and task.pooling are set for it)
Measured numbers: experiments/transfer/ (README "Transfer learning").
"""

import os

from tpu_lm import tasks
from tpu_lm.config import defaults, derived
from tpu_lm.inference import run_dir


def get_config(run: str = ""):
  c = defaults.get_config()
  if not run:
    raise ValueError("name the run to fine-tune: --config=configs/finetune.py:RUN")
  workdir = os.path.abspath(os.path.expanduser(run))
  source = run_dir.read_config(workdir, run_dir.resolve_step(workdir))
  c.init_from = workdir
  c.model = source.model
  for key in ("tokenizer", "vocab_size", "seq_len"):
    c.data[key] = source.data[key]
  c.data.sentinels = derived.sentinels(source.data, tasks.from_config(source))  # its vocabulary keeps them
  # The run's own tokenizer file, so a run from scratch with this config (init_from="")
  # speaks the same tokenizer (fine-tuning reads it from the run in any case).
  c.data.tokenizer_path = {"sentencepiece": os.path.join(workdir, "tokenizer.model"),
                           "hf": os.path.join(workdir, "hf_tokenizer")}.get(source.data.tokenizer, "")
  c.num_train_steps = 300
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 300, 300
  c.optim.learning_rate = source.optim.learning_rate / 10
  c.optim.warmup_steps = 30
  c.sample.update(source.sample.to_dict())
  if source.task.kind == "mlm":  # an encoder: classify from its first (CLS) token, reading both ways
    c.task.update(attention="bidirectional", pooling="first")
    c.mlm.update(source.mlm.to_dict())
    c.sample.num_prompts = 0
  return c
