"""Pictures and pages of what probe.py computes: attention heatmaps (PNG per layer, its
heads side by side, and one self-contained HTML page with the tokens on both axes),
the logit lens as a table, attributions and patching as heatmaps."""

import html
import json
import os

import numpy as np


def label(piece: str) -> str:
  """A token as a visible label: quoted where it has spaces or newlines at its ends."""
  return repr(piece)[1:-1] if piece.strip() == piece and piece else repr(piece)


def _labels(pieces):
  return [label(p) for p in pieces]


def attention_pngs(attention_LxNxTxT, pieces, directory: str) -> list[str]:
  """One PNG per layer: its heads' attention maps (query rows, key columns)."""
  from matplotlib.figure import Figure  # no pyplot: a library never switches the caller's backend

  labels = _labels(pieces)
  paths = []
  layers, heads, t, _ = attention_LxNxTxT.shape
  size = max(3.0, 0.28 * t + 1.5)
  for layer in range(layers):
    fig = Figure(figsize=(size * heads, size), layout="constrained")
    axes = fig.subplots(1, heads, squeeze=False)
    for h, ax in enumerate(axes[0]):
      ax.imshow(attention_LxNxTxT[layer, h], cmap="viridis", vmin=0.0, vmax=1.0)
      ax.set_title(f"layer {layer} head {h}", fontsize=9)
      ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
      ax.set_yticks(range(t), labels if h == 0 else [""] * t, fontsize=7)
      ax.set_xlabel("key (attended to)", fontsize=8)
      if h == 0:
        ax.set_ylabel("query", fontsize=8)
    paths.append(os.path.join(directory, f"attention_layer{layer}.png"))
    fig.savefig(paths[-1], dpi=100)
  return paths


def heatmap_png(values_RxC, row_labels, col_labels, title: str, path: str, cmap="RdBu_r", center=True) -> str:
  from matplotlib.figure import Figure  # no pyplot: a library never switches the caller's backend

  r, c = values_RxC.shape
  fig = Figure(figsize=(max(4, 0.35 * c + 2), max(2.5, 0.4 * r + 1.5)), layout="constrained")
  ax = fig.subplots()
  finite = values_RxC[np.isfinite(values_RxC)]
  lim = float(np.abs(finite).max()) if finite.size else 1.0
  im = ax.imshow(values_RxC, cmap=cmap, vmin=-lim if center else None, vmax=lim if center else None, aspect="auto")
  ax.set_xticks(range(c), _labels(col_labels), rotation=90, fontsize=7)
  ax.set_yticks(range(r), row_labels, fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, shrink=0.8)
  fig.savefig(path, dpi=100)
  return path


def lens_text(ids_PxTxK, probs_PxTxK, pieces, points, decode) -> str:
  """The logit lens as a table: per position, the top prediction at every probe point."""
  rows = [["position", "token", *points]]
  for t, piece in enumerate(pieces):
    rows.append([str(t), repr(piece), *(f"{decode(int(ids_PxTxK[p, t, 0]))!r} {probs_PxTxK[p, t, 0]:.2f}"
                                        for p in range(len(points)))])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tpu_lm inspect</title><style>
body{font-family:sans-serif;margin:1em} table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 4px;text-align:center} th{background:#f4f4f4;font-weight:normal}
th.k{writing-mode:vertical-rl;transform:rotate(180deg)} td.a{width:22px;height:22px;padding:0}
code{background:#f4f4f4}</style></head><body>
<h2>__TITLE__</h2><p>__INFO__</p>
<label>layer <select id="layer"></select></label> <label>head <select id="head"></select></label>
<p>Rows: the query token; columns: the token it attends to (each row sums to 1; darker is more).</p>
<div id="map"></div>
<h3>Logit lens: the top next-token prediction read off each layer's residual stream</h3>__LENS__
<h3>Attributions to the prediction __TARGET__</h3>__ATTR__
<script>
const A = __DATA__, T = __TOKENS__;
const L = document.getElementById("layer"), H = document.getElementById("head");
A.forEach((_, i) => L.add(new Option(i, i))); A[0].forEach((_, i) => H.add(new Option(i, i)));
const esc = s => s.replace(/[&<>]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;"}[c]));
function draw() {
  const m = A[L.value][H.value];
  let h = "<table><tr><th></th>" + T.map(t => `<th class="k">${esc(t)}</th>`).join("") + "</tr>";
  m.forEach((row, q) => {
    h += `<tr><th>${esc(T[q])}</th>` + row.map((p, k) =>
      `<td class="a" title="${esc(T[q])} -> ${esc(T[k])}: ${p.toFixed(3)}" style="background:rgba(40,60,160,${p})"></td>`).join("") + "</tr>";
  });
  document.getElementById("map").innerHTML = h + "</table>";
}
L.onchange = H.onchange = draw; draw();
</script></body></html>"""


def page(path, *, title, info, attention_LxNxTxT, pieces, lens_rows, attr_rows, target) -> str:
  """The self-contained HTML page: attention (pick layer and head), lens and attributions."""
  def table(rows):
    head, *body = rows
    out = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
    for r in body:
      out += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
    return out + "</table>"

  text = (_PAGE.replace("__TITLE__", html.escape(title)).replace("__INFO__", html.escape(info))
          .replace("__LENS__", table(lens_rows)).replace("__ATTR__", table(attr_rows))
          .replace("__TARGET__", html.escape(target))
          .replace("__DATA__", json.dumps(np.round(attention_LxNxTxT, 4).tolist()))
          .replace("__TOKENS__", json.dumps(_labels(pieces))))
  with open(path, "w") as f:
    f.write(text)
  return path
