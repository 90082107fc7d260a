"""Where a model that reads images looks: for each token of what it reads, the attention
its prediction pays to each patch of the picture.

The text is the model's own greedy reading of the image (or a transcript given to
explain); one forward pass of the reference attention path records every layer's
attention. The token at text position k is predicted by the query before it (BOS's for
the first), and that query's attention over the image's positions, averaged over heads
and layers, is laid back onto the patch grid: `maps_KxRxC`, each map summing to the
share of attention the image got (the rest went to BOS and earlier text). Written as one
PNG: the picture, then per token the picture tinted by its map.
"""

import os

import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.interpret.probe import compiled_apply


def _forward(m, tokens_T: list[int], pixels, prefix: int, record: bool):
  t = len(tokens_T)
  tokens_1xT = jnp.asarray(tokens_T, jnp.int32)[None]
  inputs = (tokens_1xT, jnp.ones_like(tokens_1xT), jnp.arange(t)[None])
  from tpu_lm.model.vision import pixels_to_unit

  fn = compiled_apply(m.model, record=record)
  # model.apply's keywords go through the compiled lambda's positional inputs: (cache, prefix, images)
  return fn({"params": m.params}, *inputs, None, jnp.arange(t)[None] < prefix, pixels_to_unit(jnp.asarray(pixels)[None]))


def read(m, pixels, max_new: int) -> list[int]:
  """The model's greedy reading of `pixels` (text ids, without BOS or EOS)."""
  vision = m.model.cfg.vision
  slots, length = vision.num_patches, m.model.cfg.max_len
  ids: list[int] = []
  while len(ids) < max_new and slots + 1 + len(ids) < length:
    tokens = [0] * slots + [m.tokenizer.bos_id] + ids
    padded = tokens + [0] * (length - len(tokens))  # one compiled length; causal text ignores the padding after it
    logits_1xTxV = _forward(m, padded, pixels, slots + 1, record=False)
    nxt = int(np.argmax(np.asarray(logits_1xTxV[0, len(tokens) - 1, :m.tokenizer.vocab_size])))
    if nxt == m.tokenizer.eos_id:
      break
    ids.append(nxt)
  return ids


def attention_maps(m, pixels, text_ids: list[int]) -> np.ndarray:
  """[K, rows, cols]: for each text token, its prediction's attention over the image's
  patches (mean over heads and layers)."""
  vision = m.model.cfg.vision
  slots = vision.num_patches
  tokens = [0] * slots + [m.tokenizer.bos_id] + list(text_ids)
  _, state = _forward(m, tokens, pixels, slots + 1, record=True)
  inter = state["intermediates"]
  probs_LxNxTxT = np.stack([np.asarray(inter[f"layers_{i}"]["attn"]["attn_probs"][0][0])
                            for i in range(m.model.cfg.num_layers)])
  queries = np.arange(len(text_ids)) + slots  # BOS (at `slots`) predicts the first token
  image_KxN = probs_LxNxTxT[:, :, queries, :slots].mean(axis=(0, 1))
  rows, cols = vision.grid
  return image_KxN.reshape(len(text_ids), rows, cols)


def inspect_image(m, pixels, text: str | None = None, out: str = "", max_new: int = 64) -> dict:
  """What the model reads in `pixels` (or `text`, a transcript to explain) and where each
  of its tokens looks; with `out`, writes image_attention.png there."""
  vision = m.model.cfg.vision
  if vision is None:
    raise UserError(f"{m.workdir} reads no images (it has no vision encoder): leave out --image.")
  ids = read(m, pixels, max_new) if text is None else [int(t) for t in m.tokenizer.encode_batch([text])[0]]  # as training encodes
  if not ids:
    raise UserError("there is nothing to explain: the model reads no text in this image; pass the transcript"
                    " with --text.")
  if vision.num_patches + 1 + len(ids) > m.model.cfg.max_len:
    raise UserError(f"--text has {len(ids)} tokens; after the image this model reads at most"
                    f" {m.model.cfg.max_len - vision.num_patches - 1}: shorten it.")
  maps = attention_maps(m, pixels, ids)
  pieces = [m.tokenizer.decode([t]) for t in ids]
  result = {"text": m.tokenizer.decode(ids), "tokens": pieces, "maps_KxRxC": maps, "files": []}
  if out:
    os.makedirs(out, exist_ok=True)
    result["files"] = [png(pixels, maps, pieces, os.path.join(out, "image_attention.png"))]
  return result


def png(pixels, maps_KxRxC, pieces, path: str, dpi: int = 100) -> str:
  """The picture, then one row per token: the picture with its attention map in red."""
  from matplotlib.figure import Figure  # no pyplot: a library never switches the caller's backend

  from tpu_lm.interpret.render import label

  image = np.asarray(pixels, np.float32)
  gray = image.mean(-1) / 255.0 if image.ndim == 3 else image / 255.0
  h, w = gray.shape
  k = len(pieces)
  fig = Figure(figsize=(max(4.0, w / 40), 0.45 + (k + 1) * max(0.35, h / 40)), layout="constrained")
  axes = fig.subplots(k + 1, 1, squeeze=False)[:, 0]
  axes[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
  axes[0].set_title("image", fontsize=8, loc="left")
  peak = float(maps_KxRxC.max()) or 1.0
  for ax, piece, attention_RxC in zip(axes[1:], pieces, maps_KxRxC):
    rows, cols = attention_RxC.shape
    heat = np.kron(attention_RxC / peak, np.ones((h // rows, w // cols)))  # each patch's value over its pixels
    tinted = np.stack([gray * (1 - heat) + heat, gray * (1 - heat), gray * (1 - heat)], -1)
    ax.imshow(np.clip(tinted, 0, 1))
    ax.set_title(f"{label(piece)}   (attention to the image {attention_RxC.sum():.2f})", fontsize=7, loc="left")
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.savefig(path, dpi=dpi)
  return path
