"""Distill a teacher run into the base config's model:

  python -m tpu_lm.main --config=configs/distill.py:workdirs/teacher --workdir=workdirs/distilled

The part after the colon is the teacher (any language-model run directory: trained
here, fine-tuned, or converted from Hugging Face). The student is the defaults' model
and schedule (the base config's model with AdamW and cosine), trained on the same data in the teacher's tokenizer; each step
runs the frozen teacher on the batch and minimizes
  alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy
with alpha 0.5 and T 2 (--config.distill.alpha, --config.distill.temperature).
Measured numbers: experiments/compression (README "Compression").
"""

import os

from tpu_lm.config import defaults


def get_config(teacher: str = ""):
  if not teacher:
    raise ValueError("name the teacher run: --config=configs/distill.py:TEACHER")
  c = defaults.get_config()
  c.distill.teacher = os.path.abspath(os.path.expanduser(teacher))
  return c
