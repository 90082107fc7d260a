"""Filling masks with an encoder run (task.kind="mlm"): the most likely tokens, with
their probabilities, for each <mask> in a text, as Hugging Face's fill-mask pipeline
answers. The text is read as training read a document: [BOS] + ids + [EOS], every
position attending to every other."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.tasks import mlm


@dataclasses.dataclass(frozen=True)
class Candidate:
  token_id: int
  token: str  # its text
  probability: float
  sequence: str  # the text with this token in the mask's place (the others left as <mask>)


def fill(run: run_dir.EncoderRun, text: str, top_k: int = 5) -> list[list[Candidate]]:
  """For each <mask> in `text`, in order, its `top_k` most likely tokens (the
  vocabulary's own: never a special token)."""
  from tpu_lm.interop import hf

  tok = run.tokenizer
  if hf.imported_without_head(run.workdir):
    raise UserError(f"{run.workdir} was imported from a BertModel, which has no masked-LM head: train it on"
                    " task.kind='mlm' (--config.init_from) before filling masks, or import a BertForMaskedLM.")
  mask_id = tok.sentinels[mlm.MASK]
  # A Hugging Face tokenizer's mask is its own text (BERT's [MASK]); <mask> stands for it too.
  mask_text = tok.token_text(mask_id) if hasattr(tok, "token_text") else mlm.MASK
  text = text.replace(mlm.MASK, mask_text)
  tokens = run.encode_prompt(text)
  where = [i for i, t in enumerate(tokens) if t == mask_id]
  if not where:
    raise UserError(f"--fill_mask text has no {mlm.MASK}: write {mlm.MASK} where the model should fill in a token.")
  if len(tokens) > run.max_len:
    raise UserError(f"--fill_mask text is {len(tokens)} tokens with BOS and EOS, more than the model's context of"
                    f" {run.max_len}: shorten it.")
  probs_MxV = np.asarray(_probabilities(run.model, run.params, jnp.asarray([tokens], jnp.int32), jnp.asarray(where),
                                        tok.vocab_size, jnp.asarray(_not_text(tok))))
  pieces = text.split(mask_text)
  out = []
  for m, probs_V in enumerate(probs_MxV):
    best = np.argsort(-probs_V, kind="stable")[:top_k]
    out.append([Candidate(int(t), tok.decode([int(t)]), float(probs_V[t]),
                          mask_text.join(pieces[:m + 1]) + tok.decode([int(t)]) + mask_text.join(pieces[m + 1:]))
                for t in best])
  return out


def _not_text(tokenizer) -> np.ndarray:
  """True for the ids that are no text: pad, BOS, EOS and the sentinels."""
  out = np.zeros(tokenizer.vocab_size, bool)
  out[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.sentinels.values()]] = True
  return out


@functools.partial(jax.jit, static_argnums=(0, 4))
def _probabilities(model, params, tokens_1xT, where_M, vocab_size: int, special_V):
  """The distributions over the vocabulary at positions `where_M`, special ids excluded."""
  t = tokens_1xT.shape[1]
  logits_1xTxV = model.apply({"params": params}, tokens_1xT, jnp.ones_like(tokens_1xT), jnp.arange(t)[None])
  logits_MxV = logits_1xTxV[0, where_M, :vocab_size].astype(jnp.float32)
  return jax.nn.softmax(jnp.where(special_V, -jnp.inf, logits_MxV), axis=-1)
