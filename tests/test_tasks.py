"""Objectives are plug-ins: one defined here, in the test, trains end to end through the
unchanged data pipeline, train step and model; an unknown name is one line."""

import dataclasses
import math

import numpy as np
import pytest

from tests.conftest import corpus_for, tiny_config
from tpu_lm import tasks
from tpu_lm.config import checks
from tpu_lm.data import pipeline
from tpu_lm.errors import UserError
from tpu_lm.tasks import causal_lm


@dataclasses.dataclass(frozen=True)
class Reversed(causal_lm.LanguageModel):
  """Next-token prediction over each document's tokens in reverse order."""

  name = "reversed"

  def encode(self, records, tokenizer):
    return [dataclasses.replace(e, ids=e.ids[::-1].copy()) for e in super().encode(records, tokenizer)]


@pytest.fixture
def reversed_objective():
  tasks.register("reversed", lambda config, class_names=(): Reversed(text_key=config.data.text_key))
  yield
  del tasks.BUILDERS["reversed"]


def test_an_objective_defined_outside_the_package_trains_end_to_end(reversed_objective, corpus_dir, data_dir,
                                                                    tmp_path):
  from tpu_lm.training import loop

  config = tiny_config(corpus_dir, data_dir)
  config.task.kind = "reversed"
  config.update(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
  config.sample.num_prompts = 0
  corpus = corpus_for(config)
  doc = corpus.train.source.get([0])[0]["text"]
  batch, _ = next(iter(pipeline.eval_batches(corpus.train, seq_len=32, global_batch=1)))
  forward = corpus.tokenizer.encode_batch([doc])[0]
  assert list(batch["inputs"][0, 1:9]) == [int(i) for i in forward[::-1][:8]]  # the rows hold what it made
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert math.isfinite(result["eval_loss"]) and result["eval_tokens"] > 0
  assert np.log(corpus.tokenizer.vocab_size) > result["eval_loss"]  # it learned something


def test_an_unknown_objective_is_one_line_naming_the_known_ones():
  config = tiny_config()
  config.task.kind = "nonsense"
  with pytest.raises(UserError) as e:
    checks.validate(config)
  assert str(e.value) == ("config field task.kind is 'nonsense': use one of 'lm', 'instructions', 'classification',"
                          " 'distill', 'fim', 'mlm', 'tagging', 'reading'.")


def test_configs_written_before_objectives_had_names_find_theirs():
  config = tiny_config()
  assert tasks.name_of(config) == "lm"
  config.data.dataset = "instructions"
  assert tasks.name_of(config) == "instructions" and tasks.from_config(config).layout.loss_mask
  config.data.dataset, config.distill.teacher = "text_files", "/some/run"
  assert tasks.name_of(config) == "distill"
