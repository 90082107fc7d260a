"""Knowledge distillation into the model from a frozen teacher on the same tokens:
per target token, alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy,
the distributions at temperature T (Hinton et al., 2015; T^2 keeps the soft targets'
gradients on the scale of the hard ones'). Data and eval are the language model's.

The teacher (a run directory, distill.teacher, of the same tokenizer) is read where
the run is set up (training/setup.py); its parameters are an argument of the
compiled step, bound per trace (`bind`), never a constant compiled into it.
"""

import dataclasses

import jax
import jax.numpy as jnp

from tpu_lm.tasks import losses
from tpu_lm.tasks.causal_lm import LanguageModel

NAME = "distill"


@dataclasses.dataclass(frozen=True)
class Distill(LanguageModel):
  alpha: float = 0.5
  temperature: float = 2.0
  teacher: object = None  # the teacher's model (Linen module)
  teacher_params: object = None

  name = NAME

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    if not config.distill.teacher:
      fail("distill.teacher", "", "task.kind='distill' needs the teacher's run directory")

  def bind(self, frozen) -> "Distill":
    return dataclasses.replace(self, teacher_params=frozen)

  def loss(self, model, params, batch, rng):
    rngs = None if rng is None else {"dropout": rng}
    inputs = (batch["inputs"], batch["segment_ids"], batch["positions"])
    weights_BxT = losses.token_weights(batch)
    student_BxTxV = model.apply({"params": params}, *inputs, rngs=rngs)
    teacher_BxTxV = self.teacher.apply({"params": jax.lax.stop_gradient(self.teacher_params)}, *inputs)
    ce, count = losses.cross_entropy_sum(student_BxTxV, batch["targets"], weights_BxT)
    t = self.temperature
    log_student = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / t, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / t, axis=-1)
    kl_BxT = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    kl = (kl_BxT * weights_BxT).sum()
    total = self.alpha * t**2 * kl + (1 - self.alpha) * ce
    if self.z_loss:  # optim.z_loss, on the student's logits
      total = total + self.z_loss * losses.log_z_squared_sum(student_BxTxV, weights_BxT)
    return total, count, {"kl": kl, "ce": ce}


def build(config, class_names=()) -> Distill:
  d = config.distill
  # logits_chunk 0: the student's logits meet the teacher's whole.
  return Distill(text_key=config.data.text_key, alpha=d.alpha, temperature=d.temperature,
                 z_loss=float(config.optim.z_loss))
