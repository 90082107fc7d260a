"""Hugging Face interop for encoders against transformers itself (PyTorch on CPU): small
random BertForMaskedLM, BertModel and RobertaForMaskedLM models with their tokenizers,
made and saved by transformers, imported, run, exported and read by fill-mask."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import WORDS  # noqa: E402
from tpu_lm.data import tokenizer as tokenizer_lib  # noqa: E402
from tpu_lm.errors import UserError  # noqa: E402
from tpu_lm.inference import fill_mask, run_dir  # noqa: E402
from tpu_lm.interop import hf  # noqa: E402
from tpu_lm.tasks import mlm  # noqa: E402

TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) + "\ndef f(self, x):\n    return x * 2\n" for i in range(12)]


def _wordpiece():
  """BERT's tokenizer pipeline (lowercasing normaliser, WordPiece, [CLS] text [SEP]), trained here."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(TEXTS * 4, trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                              cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _roberta_bpe():
  """RoBERTa's: byte-level BPE, <s> text </s>, <pad> at id 1."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                              cls_token="<s>", sep_token="</s>")


def _perturb(model):
  """Random norms and biases (transformers initialises them to 1 and 0), so parity sees them;
  the key bias zeroed (dropped on import: softmax cancels it), so weights compare bitwise."""
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "LayerNorm" in n or "layer_norm" in n or n.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
      if n.endswith("attention.self.key.bias"):
        p.zero_()


class _Encoders(dict):
  """name -> (transformers model, its directory, the imported run, its tokenizer), each
  made on first use (the fast tests use BERT's alone)."""

  def __init__(self, root):
    super().__init__()
    self.root = root

  def __missing__(self, name):
    torch.manual_seed({"bert": 0, "bert_model": 1, "roberta": 2}[name])
    tok = _roberta_bpe() if name == "roberta" else _wordpiece()
    # Weights 10x the usual init, so activations are O(1): a tanh GELU for the exact one would show.
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 initializer_range=0.2)
    if name == "roberta":
      model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
          vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
          type_vocab_size=1, **shape))
    else:
      config = transformers.BertConfig(vocab_size=len(tok), max_position_embeddings=64, pad_token_id=0, **shape)
      model = (transformers.BertForMaskedLM(config) if name == "bert"
               else transformers.BertModel(config, add_pooling_layer=True))
    _perturb(model)
    model.eval().save_pretrained(self.root / name)
    tok.save_pretrained(self.root / name)
    self[name] = (model, str(self.root / name), str(self.root / f"run_{name}"), tok)
    hf.import_model(str(self.root / name), self[name][2])
    return self[name]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  return _Encoders(tmp_path_factory.mktemp("hf_encoders"))


# BERT's in the fast set; RoBERTa's, which differ in naming and position numbering, in the whole suite.
FAMILIES = ["bert", pytest.param("roberta", marks=pytest.mark.slow)]


def _ours(workdir, method=None):
  run = run_dir.load_encoder(workdir, devices=jax.devices()[:1])

  def apply(ids):
    ids = jnp.asarray(ids)
    args = (ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    return np.asarray(run.model.apply({"params": run.params}, *args, method=method))

  return apply


@pytest.mark.parametrize("name", FAMILIES)
def test_imported_masked_lm_logits_equal_transformers_at_every_position(encoders, name):
  model, _, workdir, tok = encoders[name]
  ids = np.random.default_rng(0).integers(5, len(tok), (2, 60))  # no padding id: RoBERTa numbers positions past it
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  ours = _ours(workdir)(ids)
  np.testing.assert_allclose(ours[..., :ref.shape[-1]], ref, atol=1e-4, rtol=0)
  assert (ours[..., ref.shape[-1]:] < -1e29).all()


@pytest.mark.slow
def test_an_imported_bert_model_has_transformers_hidden_states_and_a_fresh_head(encoders, tmp_path):
  model, _, workdir, _ = encoders["bert_model"]
  ids = np.random.default_rng(1).integers(5, 150, (2, 40))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(_ours(workdir, "hidden")(ids), ref, atol=1e-4, rtol=0)
  with pytest.raises(UserError, match="^.* was imported from a BertModel, which has no masked-LM head: train it"):
    fill_mask.fill(run_dir.load_encoder(workdir), "def <mask>(self):")
  with pytest.raises(UserError, match="^.* was imported from a BertModel and its masked-LM head never trained"):
    hf.export_model(workdir, str(tmp_path / "out"))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers_with_our_logits_and_its_own_weights(encoders, name, tmp_path):
  from safetensors.numpy import load_file

  _, source, workdir, tok = encoders[name]
  out = tmp_path / "out"
  hf.export_model(workdir, str(out))
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [hf.bert.ROBERTA.ARCHITECTURE if name == "roberta" else "BertForMaskedLM"]
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  ids = np.random.default_rng(2).integers(5, len(tok), (2, 50))
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, _ours(workdir)(ids)[..., :theirs.shape[-1]], atol=1e-4, rtol=0)
  # Every tensor as it came, but the token-type table: its row 0 is in the positions.
  a, b = load_file(os.path.join(source, "model.safetensors")), load_file(out / "model.safetensors")
  prefix = "roberta." if name == "roberta" else "bert."
  positions = f"{prefix}embeddings.position_embeddings.weight"
  types = f"{prefix}embeddings.token_type_embeddings.weight"
  skip = 2 if name == "roberta" else 0  # RoBERTa's rows before its first position are never read
  np.testing.assert_allclose(b[positions][skip:] + b[types][0], a[positions][skip:] + a[types][0], atol=1e-6)
  assert not b[types].any() and b[types].shape == a[types].shape
  differs = [k for k in a if k not in (positions, types) and (k not in b or not np.array_equal(a[k], b[k]))]
  assert differs == [] and set(b) <= set(a)
  theirs_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs_tok(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]


@pytest.mark.parametrize("name", FAMILIES)
def test_fill_mask_reads_the_tokenizers_own_mask_and_agrees_with_transformers_pipeline(encoders, name):
  _, source, workdir, tok = encoders[name]
  run = run_dir.load_encoder(workdir, devices=jax.devices()[:1])
  assert run.tokenizer.sentinels == {mlm.MASK: tok.mask_token_id}
  assert tokenizer_lib.load_for_run(workdir).sentinels == {mlm.MASK: tok.mask_token_id}
  text = f"def {tok.mask_token}(self, x):"
  [ours] = fill_mask.fill(run, text.replace(tok.mask_token, mlm.MASK), top_k=4)  # <mask> stands for [MASK] too
  [same] = fill_mask.fill(run, text, top_k=4)
  assert ours == same and len(ours) == 4
  pipe = transformers.pipeline("fill-mask", model=source, tokenizer=source)
  theirs = [c for c in pipe(text, top_k=12) if c["token"] not in tok.all_special_ids][:4]
  assert [c.token_id for c in ours] == [c["token"] for c in theirs]
  # Ours leave out special ids, so the same distribution renormalised: a constant ratio.
  ratios = np.array([c.probability for c in ours]) / np.array([c["score"] for c in theirs])
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
  assert ours[0].sequence == text.replace(tok.mask_token, ours[0].token)


def test_bad_encoder_checkpoints_are_refused_in_one_line(encoders, tmp_path):
  import shutil

  _, source, _, _ = encoders["bert"]
  src = tmp_path / "src"
  shutil.copytree(source, src)
  config = json.loads((src / "config.json").read_text())
  for change, message in [
      ({"hidden_act": "relu"}, "^bert with hidden_act='relu' is not supported: tpu_lm's BERT uses the exact"),
      ({"position_embedding_type": "relative_key"}, "^bert with position_embedding_type='relative_key' is not"),
      ({"architectures": ["BertForNextSentencePrediction"]}, "^.* holds a BertForNextSentencePrediction model:"
                                                              " tpu_lm converts GPT2LMHeadModel, LlamaForCausalLM,"),
  ]:
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
      hf.import_model(str(src), str(tmp_path / "run"))
  # A tokenizer with no mask token: the masked LM has nothing to read as <mask>.
  (src / "config.json").write_text(json.dumps(config))
  meta = json.loads((src / "tokenizer_config.json").read_text())
  meta.pop("mask_token")
  for file in ("tokenizer_config.json", "special_tokens_map.json"):
    if (src / file).exists():
      data = json.loads((src / file).read_text())
      data.pop("mask_token", None)
      (src / file).write_text(json.dumps(data))
  with pytest.raises(UserError, match=r"^the Hugging Face tokenizer .* has no mask token \(mask_token in its"):
    hf.import_model(str(src), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a training run
def test_an_imported_bert_trains_on_as_a_masked_lm_and_is_fine_tuned_as_an_encoder(encoders, corpus_dir, data_dir,
                                                                                   tmp_path):
  """Masking with a Hugging Face tokenizer (its [MASK] inside the vocabulary, not past it)."""
  from configs import finetune
  from tpu_lm.training import loop

  _, _, imported, tok = encoders["bert"]
  config = finetune.get_config(imported)
  # A classifier fine-tuned from it reads its first ([CLS]) token both ways (test_mlm trains one).
  assert (config.task.attention, config.task.pooling, config.data.sentinels) == ("bidirectional", "first",
                                                                                 (mlm.MASK,))
  config.task.kind = "mlm"
  config.data.update(dataset="text_files", path=corpus_dir, data_dir=data_dir, global_batch_size=8)
  config.update(num_train_steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2,
                eval_max_batches=1)
  config.optim.warmup_steps = 1
  result = loop.train_and_evaluate(config, str(tmp_path / "mlm"))
  assert 0 <= result["eval_accuracy"] <= 1 and result["eval_tokens"] > 0
  assert tokenizer_lib.load_for_run(str(tmp_path / "mlm")).sentinels == {mlm.MASK: tok.mask_token_id}


def test_an_encoder_of_another_layout_is_refused_export_in_one_line():
  from configs import encoder
  from tpu_lm.config import defaults
  from tpu_lm.interop import bert

  m = encoder.get_config().model
  bert.ROFORMER.check_exportable(m)  # the encoder config's layout exports
  defaults.llama_block(m)
  m.norm_position = "pre"
  with pytest.raises(UserError, match=r"^model.norm='rmsnorm' has no roformer equivalent \(it needs 'layernorm'\): a"
                                      r" run that mixes the families exports as neither; configs/encoder.py"):
    bert.ROFORMER.check_exportable(m)
  m = encoder.get_config().model
  m.rope_theta = 5e5
  with pytest.raises(UserError, match="^model.rope_theta=500000.0 with rope_scaling 'none': RoFormer rotates at"):
    bert.ROFORMER.check_exportable(m)


def test_the_encoder_configs_layout_exports_as_roformer_with_our_logits(tmp_path):
  """configs/encoder.py's layout (BERT's blocks, rotary positions), random weights of
  O(1) activations so a wrong column order or rotation would show; no training."""
  from configs import encoder
  from flax.core import meta

  from tpu_lm.config import derived
  from tpu_lm.model import transformer

  config = encoder.get_config()
  config.data.update(tokenizer="bytes", seq_len=64)
  config.model.update(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64)
  model_cfg = derived.model_config(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda key: transformer.Transformer(model_cfg).init(key, tokens, tokens, tokens))
  params = meta.unbox(init(jax.random.key(0))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
  tok = tokenizer_lib.add_sentinels(tokenizer_lib.ByteTokenizer(), (mlm.MASK,))
  workdir = str(tmp_path / "run")
  run_dir.write(workdir, config, params, tok)
  hf.export_model(workdir, str(tmp_path / "out"))
  theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
  assert type(theirs).__name__ == "RoFormerForMaskedLM"
  ids = np.random.default_rng(3).integers(3, 260, (2, 50))
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_ours(workdir)(ids)[..., :ref.shape[-1]], ref, atol=1e-4, rtol=0)
