"""Chat conversations as the prompt an instruction-tuned run was trained on.

Instruction tuning (data.dataset="instructions") trains on `template(prompt) +
completion`, where the template is `data.chat_template` with "{prompt}" in it
(default "{prompt}": the prompt as written). A conversation is rendered so that a
single user message is exactly a training prompt; a system message and earlier
turns are folded into that prompt as plain "System:/User:/Assistant:" lines above
the last user message (a model tuned on single-turn pairs has seen no other format).
"""

ROLES = ("system", "user", "assistant")


def template_for(config) -> str | None:
  """The run's chat template, or None if it was not instruction-tuned."""
  if config.data.dataset != "instructions":
    return None
  return config.data.chat_template


def apply(template: str, prompt: str) -> str:
  return template.replace("{prompt}", prompt)  # not str.format: braces in prompts stay text


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


def render(template: str, messages: list[dict]) -> str:
  """The prompt text for a conversation (check_messages passed)."""
  *history, last = messages
  lines = [f"{m['role'].capitalize()}: {m['content']}" for m in history]
  prompt = "\n".join([*lines, last["content"]]) if lines else last["content"]
  return apply(template, prompt)
