"""GGUF export (interop/gguf_export.py), read back with the gguf package's reader: names,
shapes, values (q and k un-permuted, and RoPE scores equal under llama.cpp's interleaved
rotation), metadata, the vocabulary, llama.cpp's tokenization of it (its SentencePiece
algorithm, written out below: llama.cpp itself is not installed here), the quantized
types, and the refusals. Runs are made from random parameters, not trained."""

import heapq
import os

import gguf
import jax
import numpy as np
import pytest

from tests.conftest import WORDS, cli_body, tiny_config
from tpu_lm.config import defaults, derived
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.interop import gguf_export, llama
from tpu_lm.model import layers
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer
from tpu_lm.tasks import fim

TEXTS = ["def f(x):\n    return x * 2  # ünïcode ✓\n", "  two  spaces\n\n\nx 12345 ✓✓ \t€", " leading space",
         "the model reads a token and predicts the next one\n\tpass", "<s> </s> <unk> <0x41> [PAD1] ▁x", "日本語"]
SP_VOCAB = 400  # the SentencePiece run's pieces; its fill-in-the-middle sentinels follow


def _run(workdir, tok, family="llama", task="lm", **model):
  """A run directory of random parameters (norms included) for `tok`; returns (config, params)."""
  config = tiny_config()
  (defaults.llama_block if family == "llama" else defaults.gpt2_block)(config.model)
  config.model.update(d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=80, max_len=64, rope_theta=5e4, norm_eps=1e-5)
  config.model.update(model)
  config.task.kind = task
  config.data.dataset = "python_stdlib"  # never read: the parameters are made here
  if isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
    config.data.update(tokenizer="sentencepiece", tokenizer_path="", vocab_size=tok.vocab_size - len(tok.sentinels))
  abstract, _ = params_lib.abstract_params(transformer.Transformer(derived.model_config(config)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), abstract)
  run_dir.write(workdir, config, params, tok)
  return config, params


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """Grouped-query attention (4 heads on 2), Llama 3 RoPE scaling, untied; rows of 80
  (the MLP's down projection) do not tile into Q8_0's blocks of 32."""
  workdir = str(tmp_path_factory.mktemp("gguf") / "bytes")
  scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 16}
  config, params = _run(workdir, tokenizer_lib.ByteTokenizer(), rope_scaling=scaling)
  path = str(tmp_path_factory.mktemp("out") / "bytes.gguf")
  gguf_export.export(workdir, path, "f32")
  return workdir, config, params, gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory):
  """Fill in the middle (sentinels past the vocabulary), tied embeddings."""
  tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(TEXTS * 40 + _corpus(), SP_VOCAB))
  tok = tokenizer_lib.add_sentinels(tok, fim.SENTINELS)
  workdir = str(tmp_path_factory.mktemp("gguf") / "spm")
  _run(workdir, tok, task="fim", tie_embeddings=True, num_kv_heads=4)
  path = str(tmp_path_factory.mktemp("out") / "spm.gguf")
  gguf_export.export(workdir, path, "f16")
  return tok, gguf.GGUFReader(path)


def _corpus():
  return [" ".join(WORDS[i:] + WORDS[:i]) + "\n    if x:\n        return None\n" for i in range(len(WORDS))]


def _field(reader, key):
  f = reader.fields[key]
  if f.types[0] == gguf.GGUFValueType.ARRAY:
    return [f.contents(i) for i in range(len(f.data))]
  return f.contents()


def _vocab(reader):
  return tuple(_field(reader, f"tokenizer.ggml.{key}") for key in ("tokens", "scores", "token_type"))


def _unpermute(w, heads):
  out, d_in = w.shape
  return w.reshape(heads, out // heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def test_the_f32_file_holds_the_runs_weights_under_llama_cpps_names(byte_run):
  _, config, params, reader = byte_run
  m = config.model
  want = llama.from_params(params, m, 259)
  tensors = {t.name: t for t in reader.tensors}
  layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
  assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
      f"blk.{i}.{n}.weight" for i in range(2) for n in layer}
  assert list(tensors["token_embd.weight"].shape) == [64, 259]  # GGUF's order: [in, out], the padding rows dropped
  assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 2 * 16]
  assert list(tensors["blk.1.ffn_down.weight"].shape) == [80, 64]
  for t in tensors.values():
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
  got = {n: np.asarray(t.data) for n, t in tensors.items()}
  np.testing.assert_array_equal(got["token_embd.weight"], want["model.embed_tokens.weight"])
  np.testing.assert_array_equal(got["output.weight"], want["lm_head.weight"])
  np.testing.assert_array_equal(got["output_norm.weight"], want["model.norm.weight"])
  for i in range(2):
    hf = f"model.layers.{i}."
    np.testing.assert_array_equal(_unpermute(got[f"blk.{i}.attn_q.weight"], 4), want[hf + "self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_unpermute(got[f"blk.{i}.attn_k.weight"], 2), want[hf + "self_attn.k_proj.weight"])
    for ours, theirs in [("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                         ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                         ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
      np.testing.assert_array_equal(got[f"blk.{i}.{ours}.weight"], want[f"{hf}{theirs}.weight"])
  scaled = layers.rope_frequencies(16, 5e4, derived.rope_scaling(m))
  np.testing.assert_allclose(layers.rope_frequencies(16, 5e4) / got["rope_freqs.weight"], scaled, rtol=1e-6)


def _rotate_half(x, positions, freqs):
  a = positions[:, None] * freqs
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], axis=-1)


def _rotate_pairs(x, positions, freqs):  # llama.cpp's LLAMA_ROPE_TYPE_NORM: dims 2i and 2i + 1
  a = positions[:, None] * freqs
  x1, x2 = x[..., 0::2], x[..., 1::2]
  return np.stack([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], axis=-1).reshape(x.shape)


def test_llama_cpps_rotation_of_the_permuted_weights_gives_our_attention_scores(byte_run):
  _, config, params, reader = byte_run
  tensors = {t.name: np.asarray(t.data, np.float64) for t in reader.tensors}
  layer = params["layers_0"]["attn"]
  x = np.random.default_rng(1).normal(size=(7, 64))
  positions = np.arange(7) * 5.0
  freqs = np.asarray(layers.rope_frequencies(16, 5e4, derived.rope_scaling(config.model)), np.float64)
  divided = np.asarray(layers.rope_frequencies(16, 5e4), np.float64) / tensors["rope_freqs.weight"]
  for head, kv in [(0, 0), (3, 1)]:  # query heads 2j and 2j + 1 read kv head j
    q = _rotate_half((x @ layer["query"]["kernel"])[:, head * 16:(head + 1) * 16], positions, freqs)
    k = _rotate_half((x @ layer["key"]["kernel"])[:, kv * 16:(kv + 1) * 16], positions, freqs)
    q_cpp = _rotate_pairs((x @ tensors["blk.0.attn_q.weight"].T)[:, head * 16:(head + 1) * 16], positions, divided)
    k_cpp = _rotate_pairs((x @ tensors["blk.0.attn_k.weight"].T)[:, kv * 16:(kv + 1) * 16], positions, divided)
    np.testing.assert_allclose(q_cpp @ k_cpp.T, q @ k.T, rtol=1e-5, atol=1e-5)


def test_the_metadata_is_llama_cpps(byte_run):
  workdir, _, _, reader = byte_run
  want = {
      "general.architecture": "llama", "general.name": os.path.basename(workdir), "llama.context_length": 64,
      "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 80,
      "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
      "llama.attention.value_length": 16, "llama.rope.dimension_count": 16, "llama.vocab_size": 259,
      "general.file_type": int(gguf.LlamaFileType.ALL_F32), "tokenizer.ggml.model": "llama",
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
      "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
      "tokenizer.ggml.add_space_prefix": False,
  }
  assert {k: _field(reader, k) for k in want} == want
  assert _field(reader, "llama.rope.freq_base") == 5e4
  assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
  assert "tokenizer.ggml.unknown_token_id" not in reader.fields


def test_the_byte_vocabulary(byte_run):
  tokens, scores, types = _vocab(byte_run[3])
  assert tokens[:3] == ["<|tpu_lm_pad|>", "<|tpu_lm_bos|>", "<|tpu_lm_eos|>"]
  assert tokens[3:6] == ["<0x00>", "<0x01>", "<0x02>"] and tokens[3 + 0x20] == "▁" and tokens[258] == "<0xFF>"
  assert types == [3] * 3 + [6] * 0x20 + [1] + [6] * (255 - 0x20)  # CONTROL, BYTE, the space NORMAL
  assert scores == [0.0] * 259


def test_the_sentencepiece_vocabulary(sentencepiece_run):
  from sentencepiece import sentencepiece_model_pb2 as pb

  tok, reader = sentencepiece_run
  proto = pb.ModelProto()
  proto.ParseFromString(tok.model_proto)
  tokens, scores, types = _vocab(reader)
  n = SP_VOCAB
  assert len(tokens) == tok.vocab_size == n + 4 and _field(reader, "llama.vocab_size") == n + 4
  assert tokens[:4] == ["<|tpu_lm_pad|>", "<|tpu_lm_bos|>", "<|tpu_lm_eos|>", "<unk>"]
  assert tokens[4:n] == [p.piece for p in proto.pieces[4:]]
  assert tokens[n:] == list(fim.SENTINELS) and types[n:] == [3] * 4
  np.testing.assert_array_equal(scores[:n], np.float32([p.score for p in proto.pieces]))
  assert types[:n] == [p.type for p in proto.pieces] and types[4] == 4 and tokens[4] == "\n"  # USER_DEFINED
  assert _field(reader, "tokenizer.ggml.unknown_token_id") == 3
  names = {t.name for t in reader.tensors}
  assert "output.weight" not in names and "rope_freqs.weight" not in names  # tied; no RoPE scaling


def _llama_cpp_tokenize(reader, text, parse_special=False):
  """llama.cpp's SentencePiece ("llama") tokenization of `text`, no BOS, from the file's
  vocabulary alone (llama-vocab.cpp): special tokens split out first, longest first
  (user-defined ones always, control and unknown ones with parse_special); then per
  fragment spaces become "▁", the characters merge pairwise into the highest-scoring
  token their text makes (ties: leftmost), and a piece that is no token falls back to
  its <0xNN> bytes."""
  tokens, scores, types = _vocab(reader)
  ids = {t: i for i, t in enumerate(tokens)}
  kinds = (3, 4, 2) if parse_special else (4,)
  fragments = [text]
  for special in sorted((i for i, t in enumerate(types) if t in kinds), key=lambda i: -len(tokens[i])):
    split = []
    for f in fragments:
      if isinstance(f, int):
        split.append(f)
        continue
      for k, part in enumerate(f.split(tokens[special])):
        split += ([special] if k else []) + ([part] if part else [])
    fragments = split
  out = []
  for f in fragments:
    out += [f] if isinstance(f, int) else _spm_session(f.replace(" ", "▁"), ids, scores)
  return out


def _spm_session(text, ids, scores):
  symbols = list(text)  # the current text of each symbol ("" once merged into its left neighbour)
  following = list(range(1, len(text))) + [-1]
  preceding = list(range(-1, len(text) - 1))
  queue = []

  def add(left, right):
    if left >= 0 and right >= 0 and symbols[left] + symbols[right] in ids:
      merged = symbols[left] + symbols[right]
      heapq.heappush(queue, (-scores[ids[merged]], left, right, len(merged)))

  for i in range(1, len(text)):
    add(i - 1, i)
  while queue:
    _, left, right, size = heapq.heappop(queue)
    if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
      continue  # a symbol of this pair merged elsewhere since
    symbols[left], symbols[right] = symbols[left] + symbols[right], ""
    following[left] = following[right]
    if following[right] >= 0:
      preceding[following[right]] = left
    add(preceding[left], left)
    add(left, following[left])
  out, i = [], 0
  while i != -1:
    # Every merged symbol is a token; a character that is not falls back to its bytes.
    piece = symbols[i]
    out += [ids[piece]] if piece in ids else [ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8")]
    i = following[i]
  return out


def test_llama_cpps_tokenization_of_the_vocabulary_gives_our_ids(byte_run, sentencepiece_run):
  tok, reader = sentencepiece_run
  texts = TEXTS + _corpus()
  for text in texts:
    ids = [int(i) for i in tok.encode_batch([text])[0]]
    assert _llama_cpp_tokenize(reader, text) == ids, text
  byte_tok = tokenizer_lib.ByteTokenizer()
  for text in texts:
    if "▁" not in text:  # llama.cpp reads a literal U+2581 as a space
      assert _llama_cpp_tokenize(byte_run[3], text) == [int(i) for i in byte_tok.encode_batch([text])[0]], text
  # The server's special strings (tokenizer.encode_text) read as llama.cpp reads them with parse_special.
  text = "<|tpu_lm_bos|><|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>"
  assert _llama_cpp_tokenize(reader, text, parse_special=True) == tokenizer_lib.encode_text(tok, text)


def test_f16_and_q8_0_read_back_close_to_f32(byte_run, tmp_path):
  workdir, _, _, reader = byte_run
  exact = {t.name: np.asarray(t.data) for t in reader.tensors}
  for kind in ("f16", "q8_0"):
    path = str(tmp_path / f"{kind}.gguf")
    gguf_export.export(workdir, path, kind)
    back = gguf.GGUFReader(path)
    assert _field(back, "general.file_type") == int(gguf_export.TYPES[kind])
    for t in back.tensors:
      want = exact[t.name]
      expected = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16
      if kind == "q8_0" and want.ndim == 2 and want.shape[-1] % 32 == 0:
        expected = gguf.GGMLQuantizationType.Q8_0
      assert t.tensor_type == expected, (kind, t.name)
      got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
      if expected == gguf.GGMLQuantizationType.Q8_0:
        # Half a step of the block's scale (max |x| / 127), plus 127 steps of its float16 rounding (2^-11).
        step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - want).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11)).all(), t.name
      else:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=t.name)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in back.tensors) or kind == "f16"
  assert os.path.getsize(tmp_path / "q8_0.gguf") < os.path.getsize(tmp_path / "f16.gguf")


def _body(argv):
  cli_body("convert", argv)


def test_the_command_writes_one_line_and_refuses_in_one_line(byte_run, tmp_path, capsys):
  workdir = byte_run[0]
  out = tmp_path / "model.gguf"
  _body([f"--workdir={workdir}", f"--to_gguf={out}", "--gguf_type=q8_0"])
  line = capsys.readouterr().out.strip()
  assert line.startswith(f"wrote {out}: GGUF q8_0, ") and "22 tensors" in line and "\n" not in line
  gpt2 = str(tmp_path / "gpt2")
  _run(gpt2, tokenizer_lib.ByteTokenizer(), family="gpt2")
  # The speedrun's choices that neither Llama nor GPT-2 can say (docs/training.md "Recipe").
  recipe = {name: str(tmp_path / name) for name in ("qk_norm", "softcap", "relu2")}
  _run(recipe["qk_norm"], tokenizer_lib.ByteTokenizer(), qk_norm=True)
  _run(recipe["softcap"], tokenizer_lib.ByteTokenizer(), logit_softcap=30.0)
  _run(recipe["relu2"], tokenizer_lib.ByteTokenizer(), mlp="relu2")
  for argv, message in [
      *(([f"--to_{kind}={tmp_path / ('x.' + kind)}", f"--workdir={recipe['qk_norm']}"],
         "was trained with model.qk_norm=True, which the Llama and GPT-2 layouts of .* cannot express") for kind in
        ("gguf", "hf")),
      ([f"--to_gguf={tmp_path / 'd.gguf'}", f"--workdir={recipe['softcap']}"], "model.logit_softcap=30.0"),
      ([f"--to_hf={tmp_path / 'e'}", f"--workdir={recipe['relu2']}"], "model.mlp='relu2' has no Llama equivalent"),
      ([f"--to_gguf={tmp_path / 'a.gguf'}", "--gguf_type=q4_k"], "--gguf_type=q4_k is not a GGUF type tpu_lm writes:"
       " use one of f32, f16, q8_0."),
      ([f"--to_gguf={out}"], f"{out} exists: pass a new --to_gguf file"),
      ([f"--to_gguf={tmp_path / 'b.gguf'}", f"--workdir={gpt2}"],
       "is a GPT-2-shape run .* export this one with --to_hf"),
      ([f"--to_gguf={tmp_path / 'c.gguf'}", "--to_hf=elsewhere"], "pass exactly one of --from_hf=DIR"),
  ]:
    argv = argv if any(a.startswith("--workdir") for a in argv) else [f"--workdir={workdir}", *argv]
    with pytest.raises(UserError, match=message) as e:
      _body(argv)
    assert "\n" not in str(e.value)
  # Nothing else written, no temporary left.
  assert sorted(os.listdir(tmp_path)) == ["gpt2", "model.gguf", "qk_norm", "relu2", "softcap"]


def test_a_hugging_face_tokenizer_is_refused(tmp_path):
  from tpu_lm.data.hf_tokenizer import HFTokenizer
  from tpu_lm.interop import tokenizer_export

  tokenizer_export.build(tokenizer_lib.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(UserError, match="is Hugging Face's .* export with --to_hf and convert that with llama.cpp's"):
    gguf_export.vocabulary(HFTokenizer(str(tmp_path), {"pad_id": 0, "bos_id": 1, "eos_id": 2}))
