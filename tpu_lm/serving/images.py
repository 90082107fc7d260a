"""Images in chat messages, as OpenAI's API sends them: a message's content may be a list
of parts, {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}. The server reads images inline only (a data: URL): it
fetches nothing. A model that reads images (task.kind="reading") reads one, before the
text; the parts' text, joined, is the message's content."""

import base64
import binascii

import numpy as np

from tpu_lm.serving.body import RequestError, shown


def split_parts(messages, shape: tuple | None) -> tuple[list, np.ndarray | None]:
  """(the messages with each content as text, the conversation's image as the model's
  pixels or None). `shape` (height, width, channels): the model's images, None if it
  reads none. Messages not shaped as a list of objects are returned as they are (the
  caller's check names what is wrong). Raises RequestError."""
  if not isinstance(messages, list):
    return messages, None
  out, images = [], []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
      out.append(m)
      continue
    texts = []
    for j, part in enumerate(m["content"]):
      where = f"messages[{i}].content[{j}]"
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
      elif kind == "image_url":
        images.append(_pixels(part.get("image_url"), where, shape))
      else:
        raise RequestError(400, f"{where} must be a {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\","
                                f" \"image_url\": {{\"url\": \"data:...\"}}}} part; got {shown(part)}.", "messages")
    out.append({**m, "content": "".join(texts)})
  if len(images) > 1:
    raise RequestError(400, f"the conversation holds {len(images)} images; this model reads one, before the text:"
                            " send one.", "messages")
  return out, images[0] if images else None


def _pixels(image_url, where: str, shape: tuple | None) -> np.ndarray:
  from tpu_lm.tasks import reading

  url = image_url.get("url") if isinstance(image_url, dict) else image_url
  if not isinstance(url, str):
    raise RequestError(400, f"{where}.image_url must be {{\"url\": \"data:image/png;base64,...\"}}; got"
                            f" {shown(image_url)}.", "messages")
  if shape is None:
    raise RequestError(400, "this model reads no images (it has no vision encoder): send text content only.",
                       "messages")
  if not url.startswith("data:"):
    raise RequestError(400, f"{where}: the image's url must be a data: URL (data:image/png;base64,...); this server"
                            f" fetches nothing, so {shown(url[:40])} is refused.", "messages")
  header, comma, payload = url.partition(",")
  if not comma or not header.endswith(";base64"):
    raise RequestError(400, f"{where}: the data: URL must be base64 (data:image/png;base64,...).", "messages")
  try:
    data = base64.b64decode(payload, validate=True)
    return reading.decode_image(data, shape)
  except (binascii.Error, ValueError) as e:
    raise RequestError(400, f"{where}: the image cannot be read ({e}): send a PNG or JPEG.", "messages") from None
