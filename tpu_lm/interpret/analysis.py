"""Everything `python -m tpu_lm.interpret` shows about one text, as one call (notebooks
call it too): each token's log-probability, attention maps, the logit lens, attributions
of a prediction, and activation patching against a corrupted text; pictures and a page
in `out`."""

import json
import os

import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.inference import score
from tpu_lm.interpret import probe, render


def inspect_text(m, text: str, *, out: str | None = None, target: str = "", position: int = -1,
                 corrupt: str = "", top_k: int = 5, ig_steps: int = 64) -> dict:
  """`m`: interpret.run.Model. `target`: the predicted token to explain (text that is
  one token; default: the model's top prediction at `position`). Returns the numbers;
  with `out`, writes attention_layer*.png, attributions.png, patching.png (with
  `corrupt`), inspect.html and inspect.json there."""
  tokens = m.encode(text)
  if len(tokens) < 2:
    raise UserError("--text is empty: give the text to look inside.")
  pieces = m.pieces(tokens)
  tr = probe.trace(m.model, m.params, tokens)
  points = probe.probe_names(m.model.cfg.num_layers)
  lens_ids, lens_probs = probe.logit_lens(m.model, m.params, tr.residual_PxTxD, top_k)
  position = probe.check_position(tokens, position)
  target_id = _target_id(m, target) if target else int(np.argmax(tr.logits_TxV[position]))
  attr = probe.attributions(m.model, m.params, tokens, position, target_id, ig_steps, m.tokenizer.pad_id)
  # Each token's log-probability given the text before it, by the one scoring function.
  [scored] = score.token_logprobs(m.model, m.params, [tokens], vocab_size=m.tokenizer.vocab_size,
                                  max_len=m.model.cfg.max_len, pad_id=m.tokenizer.pad_id)
  decode = lambda i: m.tokenizer.decode([i])  # noqa: E731
  result = {
      "tokens": pieces, "position": position, "target": decode(target_id), "target_id": target_id,
      "attention": tr.attention_LxNxTxT, "logit_lens_ids": lens_ids, "logit_lens_probs": lens_probs,
      "lens_points": points, "attributions": attr, "token_logprobs": [None, *scored.logprobs.tolist()],
      "lens_table": render.lens_text(lens_ids, lens_probs, pieces, points, decode),
  }
  if corrupt:
    result["patching"] = probe.activation_patching(m.model, m.params, tokens, m.encode(corrupt), position, target_id)
  if out:
    result["files"] = _write(m, out, result, text, decode)
  return result


def _target_id(m, target: str) -> int:
  ids = m.tokenizer.encode_batch([target])[0]
  if len(ids) != 1:
    raise UserError(f"--target={target!r} is {len(ids)} tokens ({m.pieces(ids)}): give text that is one token.")
  return int(ids[0])


def _write(m, out, r, text, decode) -> list[str]:
  os.makedirs(out, exist_ok=True)
  pieces, a = r["tokens"], r["attributions"]
  files = render.attention_pngs(r["attention"], pieces, out)
  files.append(render.heatmap_png(np.stack([a["grad_x_input"], a["integrated_gradients"]]),
                                  ["gradient x input", "integrated gradients"], pieces,
                                  f"attributions to {r['target']!r} after position {r['position']}",
                                  os.path.join(out, "attributions.png")))
  if "patching" in r:
    p = r["patching"]
    files.append(render.heatmap_png(p["restored_PxT"], p["points"], pieces,
                                    f"activation patching: share of log p({r['target']!r}) restored",
                                    os.path.join(out, "patching.png")))
  lens_rows = [["position", "token", *r["lens_points"]]] + [
      [str(t), render.label(pieces[t]),
       *(f"{render.label(decode(int(r['logit_lens_ids'][p, t, 0])))} ({r['logit_lens_probs'][p, t, 0]:.2f})"
         for p in range(len(r["lens_points"])))] for t in range(len(pieces))]
  attr_rows = [["position", "token", "gradient x input", "integrated gradients"]] + [
      [str(t), render.label(pieces[t]), f"{a['grad_x_input'][t]:+.4f}", f"{a['integrated_gradients'][t]:+.4f}"]
      for t in range(len(pieces))]
  files.append(render.page(
      os.path.join(out, "inspect.html"), title=f"{m.workdir} (step {m.step})",
      info=f"text: {text!r}; prediction explained: {r['target']!r} after position {r['position']}"
           f" (log p {a['logprob']:.3f}; integrated-gradients completeness gap {a['completeness_gap']:+.4f})",
      attention_LxNxTxT=r["attention"], pieces=pieces, lens_rows=lens_rows, attr_rows=attr_rows,
      target=repr(r["target"])))
  summary = {k: v for k, v in r.items()
             if k in ("tokens", "position", "target", "target_id", "lens_points", "token_logprobs")}
  summary["attributions"] = {k: np.asarray(v).tolist() for k, v in a.items()}
  summary["logit_lens_top"] = [[decode(int(i)) for i in row] for row in r["logit_lens_ids"][:, :, 0]]
  if "patching" in r:
    summary["patching_restored"] = np.asarray(r["patching"]["restored_PxT"]).tolist()
  files.append(os.path.join(out, "inspect.json"))
  with open(files[-1], "w") as f:
    json.dump(summary, f, indent=1)
  return files
