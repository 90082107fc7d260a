"""Hugging Face interop against transformers itself (PyTorch on CPU): small random
GPT-2 and Llama models made and saved by transformers, imported, run, exported."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import WORDS  # noqa: E402
from tpu_lm.data import tokenizer as tokenizer_lib  # noqa: E402
from tpu_lm.errors import UserError  # noqa: E402
from tpu_lm.inference import run_dir  # noqa: E402
from tpu_lm.interop import hf, tokenizer_export  # noqa: E402
from tpu_lm.model import transformer  # noqa: E402
from tpu_lm.parallel import mesh as mesh_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) + "\n\tdef f(x):\n    return x * 2  # ünïcode ✓\n" for i in range(12)]


def _byte_level_tokenizer():
  """A GPT-2-style byte-level BPE, trained here (nothing downloads)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _perturb(model, names):
  """Random norms and biases (transformers initialises them to 1 and 0), so parity sees them."""
  with torch.no_grad():
    for n, p in model.named_parameters():
      if any(k in n for k in names):
        p.add_(0.2 * torch.randn_like(p))
        if n.endswith("attn.c_attn.bias"):  # GPT-2's key bias is dropped on import (softmax cancels it)
          d = p.shape[0] // 3
          p[d:2 * d] = 0


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  torch.manual_seed(0)
  tok = _byte_level_tokenizer()
  v = tok.backend_tokenizer.get_vocab_size()
  root = tmp_path_factory.mktemp("hf")
  made = {}
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=v, n_positions=96, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
  _perturb(gpt2, ("ln", "bias"))
  llama_rope = {"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  for name, model in [
      ("gpt2", gpt2),
      # Grouped-query attention (6 query heads on 2 KV heads), Llama 3 RoPE scaling, untied;
      # a vocabulary of 3 more rows than the tokenizer, as real checkpoints often have.
      ("llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
          vocab_size=v + 3, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
          num_key_value_heads=2, max_position_embeddings=128, rope_parameters=llama_rope, rms_norm_eps=1e-5,
          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))),
      ("llama_tied", transformers.LlamaForCausalLM(transformers.LlamaConfig(
          vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=4, max_position_embeddings=96, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))),
  ]:
    if name.startswith("llama"):
      _perturb(model, ("norm",))
    model.eval().save_pretrained(root / name)
    tok.save_pretrained(root / name)
    hf.import_model(str(root / name), str(root / f"run_{name}"))
    made[name] = (model, str(root / name), str(root / f"run_{name}"))
  return made


def _ours(workdir):
  step = run_dir.resolve_step(workdir)
  config = run_dir.read_config(workdir, step)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params, model_cfg, _ = run_dir.read_model(workdir, step, config, mesh)
  model = transformer.Transformer(model_cfg)
  return lambda ids: np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.ones_like(ids),
                                            jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)))


ARCHS = ("gpt2", "llama", "llama_tied")


@pytest.mark.parametrize("name", ARCHS)
def test_imported_logits_equal_transformers_at_every_position(hf_models, name):
  model, _, workdir = hf_models[name]
  ids = np.random.default_rng(0).integers(0, 300, (2, 80))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  ours = _ours(workdir)(ids)
  np.testing.assert_allclose(ours[..., :ref.shape[-1]], ref, atol=1e-4, rtol=0)
  assert (ours[..., ref.shape[-1]:] < -1e29).all()  # padding rows of the table are never predicted


def _retokenized(source, tmp_path, post_processor=None, **tokenizer_config):
  """A copy of the Hugging Face model directory `source` whose tokenizer.json gets
  `post_processor` (tokenizers.processors) and tokenizer_config.json the keys given."""
  import shutil

  dst = tmp_path / "retokenized"
  shutil.copytree(source, dst)
  if post_processor is not None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tokenizer.post_processor = post_processor
    tokenizer.save(str(dst / "tokenizer.json"))
  config = json.loads((dst / "tokenizer_config.json").read_text())
  (dst / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_config}))
  return str(dst)


def _llama3_post_processor():
  """What Llama 3's tokenizer.json does: ByteLevel, then the BOS token before the text."""
  from tokenizers import processors

  bos = ("<|endoftext|>", 0)
  return processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
      single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]}:1 $B:1", special_tokens=[bos])])


@pytest.mark.parametrize("name, tokenizer", [
    ("gpt2", None),  # no special tokens added (GPT-2's own tokenizer adds none)
    ("llama", None),
    ("llama", "llama3"),  # the post-processor adds BOS
    ("llama", "add_bos_token"),  # which transformers 5 ignores beside a tokenizer.json
])
def test_imported_runs_continue_the_plain_text_as_transformers_generate_does(hf_models, tmp_path, name, tokenizer):
  from tpu_lm.interpret import run as interpret_run

  model, source, workdir = hf_models[name]
  if tokenizer:
    source = _retokenized(source, tmp_path, _llama3_post_processor() if tokenizer == "llama3" else None,
                          **({"add_bos_token": True} if tokenizer == "add_bos_token" else {}))
    workdir = str(tmp_path / "run")
    hf.import_model(source, workdir)
  text = "the model reads"
  ids = transformers.AutoTokenizer.from_pretrained(source)(text)["input_ids"]  # transformers' own encoding
  assert (ids[0] == 0) == (tokenizer == "llama3")
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  [c] = run.decoder.generate([run.encode_prompt(text)], run_dir.decode.Sampling(32, 0.0))
  with torch.no_grad():
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=32, do_sample=False, eos_token_id=run.tokenizer.eos_id,
                         pad_token_id=run.tokenizer.pad_id)[0, len(ids):].tolist()
  assert c.tokens == ref[:len(c.tokens)] and (len(c.tokens) == 32 or c.tokens[-1] == run.tokenizer.eos_id)
  # generate, serve and scoring (the memorization audit, inspect) all encode the same way
  assert run.encode_prompt(text) == interpret_run.load(workdir).encode(text) == ids


def test_the_prompt_convention_follows_the_run(hf_models, trained_run, tmp_path):
  """Trained here: [BOS] + tokens; imported: the tokenizer's own; a copy of an imported
  run (python -m tpu_lm.compress writes one) keeps it; a run directory written before
  the convention was recorded is prompted with [BOS] + tokens, as it was then."""
  text = "the model reads"
  trained = run_dir.load(trained_run, devices=jax.devices()[:1])
  tok = trained.tokenizer
  assert trained.encode_prompt(text) == [tok.bos_id, *map(int, tok.encode_batch([text])[0])]
  _, _, imported = hf_models["gpt2"]
  tok = tokenizer_lib.load_for_run(imported)
  plain = tok.encode_batch([text])[0]
  assert tokenizer_lib.encode_prompt(tok, text) == plain
  step = run_dir.resolve_step(imported)
  config = run_dir.read_config(imported, step)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params = jax.tree.map(np.asarray, run_dir.read_model(imported, step, config, mesh, "float32")[0])
  run_dir.write(str(tmp_path / "copy"), config, params, tok)
  assert tokenizer_lib.encode_prompt(tokenizer_lib.load_for_run(str(tmp_path / "copy")), text) == plain
  # what training writes, here fine-tuning from the imported run (its tokenizer read from there)
  tokenizer_lib.save_for_run(tok, str(tmp_path))
  assert tokenizer_lib.encode_prompt(tokenizer_lib.load_for_run(str(tmp_path)), text) == [tok.bos_id, *plain]
  meta_path = tmp_path / "copy" / tokenizer_lib.RUN_FILE
  meta = json.loads(meta_path.read_text())
  assert meta["prompt"] == tokenizer_lib.PROMPT_OWN
  del meta["prompt"]
  meta_path.write_text(json.dumps(meta))
  assert tokenizer_lib.encode_prompt(tokenizer_lib.load_for_run(str(tmp_path / "copy")), text) == [tok.bos_id, *plain]


@pytest.mark.slow
def test_a_run_fine_tuned_from_an_imported_one_is_prompted_with_bos(hf_models, corpus_dir, data_dir, tmp_path):
  from configs import finetune
  from tpu_lm.training import loop

  _, _, imported = hf_models["llama_tied"]
  config = finetune.get_config(imported)
  config.data.update(dataset="text_files", path=corpus_dir, data_dir=data_dir, seq_len=32, global_batch_size=8)
  config.update(num_train_steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2, eval_max_batches=1)
  config.optim.warmup_steps = 1
  config.sample.update(num_prompts=1, prompt_tokens=4, new_tokens=2)
  workdir = str(tmp_path / "tuned")
  loop.train_and_evaluate(config, workdir)  # packs every document as [BOS] + tokens + [EOS]
  tok = tokenizer_lib.load_for_run(workdir)
  assert tok.prompt == tokenizer_lib.PROMPT_BOS
  assert tokenizer_lib.encode_prompt(tok, "the model") == [tok.bos_id, *tok.encode_batch(["the model"])[0]]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_exported_hf_tokenizer_prompts_as_the_run_was_trained(hf_models, name, tmp_path):
  """A run trained here on a Hugging Face tokenizer (or fine-tuned from an imported run)
  saw every document start with BOS: its export's tokenizer adds it, as ours does; an
  imported run's export keeps the tokenizer as it came."""
  _, _, imported = hf_models[name]
  tok = tokenizer_lib.load_for_run(imported)
  for prompt in (tokenizer_lib.PROMPT_OWN, tokenizer_lib.PROMPT_BOS):
    tok.prompt = prompt
    out = tmp_path / prompt.replace(" ", "_").replace("'", "")
    out.mkdir()
    tokenizer_export.write(tok, str(out))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("def f(x):\n    return x", " the model reads"):
      assert theirs(text).input_ids == tokenizer_lib.encode_prompt(tok, text), (prompt, text)


@pytest.mark.parametrize("name", ARCHS)
def test_export_loads_in_transformers_with_our_logits_and_bitwise_weights(hf_models, name, tmp_path):
  from safetensors.numpy import load_file

  _, source, workdir = hf_models[name]
  hf.export_model(workdir, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.default_rng(1).integers(0, 300, (2, 40))
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, _ours(workdir)(ids)[..., :theirs.shape[-1]], atol=1e-4, rtol=0)
  a, b = load_file(os.path.join(source, "model.safetensors")), load_file(tmp_path / "out" / "model.safetensors")
  b.pop("lm_head.weight", None) if "lm_head.weight" not in a else None
  assert sorted(a) == sorted(b)
  assert [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])] == []
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tok(TEXTS[0])["input_ids"] == transformers.AutoTokenizer.from_pretrained(source)(TEXTS[0])["input_ids"]


def test_bfloat16_sharded_checkpoints_import_and_export_bitwise(hf_models, tmp_path):
  import copy
  import shutil

  from safetensors.torch import load_file

  model, source, _ = hf_models["llama_tied"]
  src = tmp_path / "bf16"
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(source, name), src / name)
  assert os.path.exists(src / "model.safetensors.index.json")
  hf.import_model(str(src), str(tmp_path / "run"))
  hf.export_model(str(tmp_path / "run"), str(tmp_path / "out"))  # auto: the dtype it came in
  theirs = {}
  for shard in set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()):
    theirs.update(load_file(src / shard))
  ours = load_file(tmp_path / "out" / "model.safetensors")
  assert sorted(ours) == sorted(theirs)
  assert all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_hf_tokenizer_keeps_its_special_ids_and_bits_per_byte_exact(hf_models):
  _, source, workdir = hf_models["gpt2"]
  ours = tokenizer_lib.load_for_run(workdir)
  theirs = transformers.AutoTokenizer.from_pretrained(source)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 0, 0)  # <|endoftext|>, as GPT-2's
  for text in TEXTS:
    ids = ours.encode_batch([text])[0]
    assert ids == theirs(text)["input_ids"] and ours.decode(ids) == text  # lossless: bytes are exact


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_our_tokenizers_export_to_the_same_ids(kind, tmp_path):
  if kind == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
  else:
    tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(TEXTS * 20, 300))
  tokenizer_export.write(tok, str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in TEXTS + ["  two  spaces\n\n\nx 12345 ✓✓ \t€"]:
    ids = [int(i) for i in tok.encode_batch([text])[0]]
    assert theirs(text)["input_ids"] == [tok.bos_id] + ids, text
    assert theirs.decode(ids) == text


def _sentencepiece_run(hf_models, workdir):
  """A Llama-shape run directory with a SentencePiece tokenizer (the imported Llama's
  parameters, a tokenizer of its vocabulary size trained here)."""
  _, _, imported = hf_models["llama_tied"]
  step = run_dir.resolve_step(imported)
  config = run_dir.read_config(imported, step)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params = jax.tree.map(np.asarray, run_dir.read_model(imported, step, config, mesh, "float32")[0])
  tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(TEXTS * 20, config.data.vocab_size))
  config.data.update(tokenizer="sentencepiece", tokenizer_path="")
  run_dir.write(workdir, config, params, tok)
  return tok


def test_a_sentencepiece_run_exports_its_own_model_for_sentencepiece_consumers(hf_models, tmp_path):
  import sentencepiece as spm

  tok = _sentencepiece_run(hf_models, str(tmp_path / "run"))
  hf.export_model(str(tmp_path / "run"), str(tmp_path / "out"))
  out = tmp_path / "out"
  assert (out / "tokenizer.model").read_bytes() == (tmp_path / "run" / "tokenizer.model").read_bytes()
  assert json.loads((out / "tokenizer_config.json").read_text())["add_prefix_space"] is False
  sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))  # what llama.cpp's converter loads
  llama = transformers.LlamaTokenizer.from_pretrained(out)  # reads add_prefix_space
  for text in TEXTS + [" leading space", "    return x\n", "\n\n  def f():\n\tpass  # ünïcode 日本語 ✓\n", "  \t\n"]:
    ids = [int(i) for i in tok.encode_batch([text])[0]]
    assert sp.encode(text) == ids, text
    assert llama(text)["input_ids"] == [tok.bos_id] + ids, text


def test_a_trained_run_exports_and_reimports(trained_run, tmp_path):
  out = tmp_path / "hf"
  hf.export_model(trained_run, str(out), dtype="float32")
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = np.random.default_rng(2).integers(3, 259, (1, 30))
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, _ours(trained_run)(ids)[..., :259], atol=1e-4, rtol=0)
  hf.import_model(str(out), str(tmp_path / "again"))
  np.testing.assert_allclose(_ours(str(tmp_path / "again"))(ids)[..., :259], theirs, atol=1e-4, rtol=0)


def _edit_config(source, tmp_path, **changes):
  import shutil

  dst = tmp_path / "edited"
  shutil.copytree(source, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(changes)
  (dst / "config.json").write_text(json.dumps(config))
  return str(dst)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["T5ForConditionalGeneration"]}, "holds a T5ForConditionalGeneration model: tpu_lm converts"
                                                         " GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM,"),
    ({"n_embd": 64}, r"has shape \(.*\), its config.json makes"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
])
def test_unsupported_or_mismatched_models_are_one_line(hf_models, tmp_path, change, message):
  src = _edit_config(hf_models["gpt2"][1], tmp_path, **change)
  with pytest.raises(UserError, match=message):
    hf.import_model(src, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_missing_weights_and_an_existing_run_are_one_line(hf_models, tmp_path):
  src = _edit_config(hf_models["gpt2"][1], tmp_path)
  os.remove(os.path.join(src, "model.safetensors"))
  with pytest.raises(UserError, match="has no model.safetensors or model.safetensors.index.json"):
    hf.import_model(src, str(tmp_path / "run"))
  with pytest.raises(UserError, match="already holds a run .* pass a new --workdir directory"):
    hf.import_model(hf_models["gpt2"][1], hf_models["gpt2"][2])


def test_a_converted_run_is_fine_tuned_not_resumed(hf_models, corpus_dir, data_dir):
  from tests.conftest import tiny_config
  from tpu_lm.training import loop

  workdir = hf_models["llama_tied"][2]
  with pytest.raises(UserError, match=r"holds parameters only .* --config.init_from="):
    loop.train_and_evaluate(tiny_config(corpus_dir, data_dir), workdir)


@pytest.mark.slow
def test_convert_command_line(hf_models, tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}

  def convert(*flags):
    return subprocess.run([sys.executable, "-m", "tpu_lm.convert", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)

  ok = convert(f"--to_hf={tmp_path / 'out'}", f"--workdir={hf_models['llama'][2]}")
  assert ok.returncode == 0 and "wrote" in ok.stdout, ok.stderr[-2000:]
  bad = convert(f"--from_hf={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'run'}")
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
  both = convert("--from_hf=a", "--to_hf=b", "--workdir=c")
  assert both.returncode == 2 and "exactly one of --from_hf" in both.stderr
