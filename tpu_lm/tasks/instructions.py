"""Instruction tuning: the language model trained on {"prompt", "completion"} records,
the prompt written into the run's chat template (data.chat_template, "{prompt}" in
it), the loss on the completion's tokens only. A conversation sent to the server's
chat completions is rendered into the same form (`chat_prompt`)."""

import dataclasses
import json

import numpy as np

from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import RowLayout
from tpu_lm.tasks.causal_lm import LanguageModel

NAME = "instructions"
DATASET = "instructions"  # the offline builder of JSONL {"prompt", "completion"} files (data/builders.py)
ROLES = ("system", "user", "assistant")


def apply(template: str, prompt: str) -> str:
  return template.replace("{prompt}", prompt)  # not str.format: braces in prompts stay text


@dataclasses.dataclass(frozen=True)
class Instructions(LanguageModel):
  chat_template: str = "{prompt}"

  name = NAME
  chat = True
  layout = RowLayout(loss_mask=True)
  records = "instructions"
  text_reference = False

  def features(self) -> list[tuple[str, str]]:
    return [("prompt", "prompt"), ("completion", "completion")]

  def sample_text(self, record) -> str:
    return as_text(record["prompt"]) + as_text(record["completion"])

  def encode(self, records, tokenizer) -> list[Encoded]:
    prompts = [apply(self.chat_template, as_text(r["prompt"])) for r in records]
    completions = [as_text(r["completion"]) for r in records]
    out = []
    for p, c, text in zip(tokenizer.encode_batch(prompts), tokenizer.encode_batch(completions), completions):
      ids = np.concatenate([np.asarray(p, np.int32), np.asarray(c, np.int32)])
      weights = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(c), np.int32)])
      out.append(Encoded(ids, num_bytes=len(text.encode("utf-8")), weights=weights))
    return out

  def chat_prompt(self, messages: list[dict]) -> str:
    """A conversation (checked by check_messages) as the prompt text: a single user
    message is exactly a training prompt; a system message and earlier turns are folded
    into it as plain "System:/User:/Assistant:" lines above the last user message (a
    model tuned on single-turn pairs has seen no other format)."""
    *history, last = messages
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in history]
    return apply(self.chat_template, "\n".join([*lines, last["content"]]) if lines else last["content"])


def jinja_template(template: str) -> str:
  """`chat_prompt` as a Jinja chat template over `messages` (what Hugging Face chat
  templates are), for clients that render prompts themselves (the server's
  /tokenizer_info): the same text for every conversation check_messages accepts."""
  # The template's text as Jinja string literals (JSON's escapes are Jinja's), "{prompt}" between them.
  literal = lambda text: "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # noqa: E731
  return ("{%- set ns = namespace(body='') -%}"
          "{%- for m in messages -%}"
          "{%- if loop.last -%}{%- set ns.body = ns.body ~ m['content'] -%}"
          "{%- else -%}{%- set ns.body = ns.body ~ (m['role'] | capitalize) ~ ': ' ~ m['content'] ~ '\\n' -%}"
          "{%- endif -%}{%- endfor -%}"
          + "{{ ns.body }}".join(literal(part) for part in template.split("{prompt}")))


def check_messages(messages) -> str | None:
  """What is wrong with a `messages` list, in one sentence, or None."""
  if not isinstance(messages, list) or not messages:
    return "'messages' is required: a non-empty list of {\"role\", \"content\"} objects."
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      return (f"messages[{i}] must be an object with a role ({', '.join(ROLES)}) and a string content;"
              f" got {str(m)[:80]}.")
  if messages[-1]["role"] != "user":
    return "the last message must be the user's: the model answers it."
  return None


def build(config, class_names=()) -> Instructions:
  return Instructions(text_key=config.data.text_key, logits_chunk=config.model.logits_chunk,
                      z_loss=float(config.optim.z_loss),
                      chat_template=config.data.chat_template)
