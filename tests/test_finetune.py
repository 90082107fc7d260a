"""Fine-tuning: init_from, frozen parameters, LoRA (trained, saved, merged), instruction
tuning with a loss mask, and sequence classification with its metrics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import corpus_for, tiny_config
from tpu_lm.data import pipeline, sources
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.tasks import classification, losses
from tpu_lm.training import checkpoint, init_from, loop, trainable
from tpu_lm.training.setup import Setup

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _finetune_config(corpus_dir, data_dir, source, **optim):
  c = tiny_config(corpus_dir, data_dir)
  c.init_from = source
  c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 100, 100
  c.optim.update(warmup_steps=1, **optim)
  return c


def _saved_params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  step = ckpt.latest_step()
  ckpt.close()
  config = run_dir.read_config(workdir, step)
  mesh = mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1])
  setup = Setup(config, mesh)
  with setup.context():
    raw = run_dir.read_params(workdir, step, setup.abstract_state.params,
                              jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                           setup.abstract_state.params))
  return jax.tree.map(np.asarray, raw)


def _flat(tree):
  return {trainable.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_init_from_starts_from_the_source_parameters_with_a_fresh_optimizer(trained_run, corpus_dir, data_dir):
  config = _finetune_config(corpus_dir, data_dir, trained_run)
  setup = Setup(config, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))
  with setup.context():
    fresh = setup.init(jax.random.key(123))
    params = init_from.load(setup, trained_run, fresh.params)
  source = _flat(_saved_params(trained_run))
  assert _flat(params).keys() == source.keys()
  assert all(np.array_equal(v, source[k]) for k, v in _flat(params).items())
  assert int(fresh.step) == 0 and float(optim_mu_norm(fresh.opt_state)) == 0.0


def test_init_from_a_per_layer_run_into_scanned_layers(trained_run, corpus_dir, data_dir):
  from tpu_lm.model import params as params_lib

  config = _finetune_config(corpus_dir, data_dir, trained_run)
  config.model.scan_layers = True
  setup = Setup(config, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))
  with setup.context():
    params = init_from.load(setup, trained_run, setup.init(jax.random.key(1)).params)
  source = _flat(params_lib.stack_layers(_saved_params(trained_run), 2))
  assert all(np.array_equal(v, source[k]) for k, v in _flat(params).items())


def optim_mu_norm(opt_state):
  return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(opt_state) if hasattr(x, "shape") and x.ndim > 0)


def test_init_from_names_the_first_architecture_difference(trained_run, corpus_dir, data_dir):
  config = _finetune_config(corpus_dir, data_dir, trained_run)
  config.model.num_layers = 3
  setup = Setup(config, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))
  with pytest.raises(UserError, match=r"has model.num_layers=2, this config 3: .* \(set model.num_layers=2"):
    init_from.check(setup, trained_run)


def _trained(config, tmp_path_factory, name):
  workdir = str(tmp_path_factory.mktemp(name) / "run")
  loop.train_and_evaluate(config, workdir)
  return workdir, config


@pytest.fixture(scope="module")
def frozen_run(trained_run, corpus_dir, data_dir, tmp_path_factory):
  config = _finetune_config(corpus_dir, data_dir, trained_run, freeze=("embed/.*", "pos_embed", "layers_0/.*"))
  return _trained(config, tmp_path_factory, "frozen")


def test_frozen_parameters_never_move_and_have_no_optimizer_state(frozen_run, trained_run):
  workdir, config = frozen_run
  before, after = _flat(_saved_params(trained_run)), _flat(_saved_params(workdir))
  frozen = [k for k in before if k.startswith(("embed/", "pos_embed", "layers_0/"))]
  assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
  assert all(not np.array_equal(before[k], after[k]) for k in before if k not in frozen and "kernel" in k)
  setup = Setup(config, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))
  moments = [x.shape for x in jax.tree.leaves(setup.abstract_state.opt_state) if x.ndim > 0]
  trained_shapes = [after[k].shape for k in after if k not in frozen]
  assert sorted(moments) == sorted(trained_shapes * 2)  # Adam's mu and nu, of the trained ones only
  assert setup.trainable_summary().startswith(f"trainable {sum(np.prod(s) for s in trained_shapes):,} of ")


@pytest.fixture(scope="module")
def lora_run(trained_run, corpus_dir, data_dir, tmp_path_factory):
  config = _finetune_config(corpus_dir, data_dir, trained_run, learning_rate=3e-2)
  config.lora.update(rank=4, alpha=8.0, targets=".*attn/(query|value)")
  return _trained(config, tmp_path_factory, "lora")


def test_lora_trains_only_adapters_and_merges_them_for_inference(lora_run, trained_run):
  workdir, config = lora_run
  before, after = _flat(_saved_params(trained_run)), _flat(_saved_params(workdir))
  adapters = {k: v for k, v in after.items() if k.endswith(("kernel_lora_a", "kernel_lora_b"))}
  assert sorted({k.rsplit("/", 1)[0] for k in adapters}) == [
      f"layers_{i}/attn/{p}" for i in (0, 1) for p in ("query", "value")]
  assert all(np.array_equal(before[k], after[k]) for k in before)  # the base model is frozen
  assert any(np.abs(v).sum() > 0 for k, v in adapters.items() if k.endswith("_b"))  # B moved off zero
  setup = Setup(config, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))
  moments = sorted(x.shape for x in jax.tree.leaves(setup.abstract_state.opt_state) if x.ndim > 0)
  assert moments == sorted([v.shape for v in adapters.values()] * 2)  # only adapters in the optimizer state
  # generate/serve read W + (alpha / rank) A B.
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  q = "layers_1/attn/query"
  merged = np.asarray(run.decoder.params["layers_1"]["attn"]["query"]["kernel"])
  want = after[f"{q}/kernel"] + (8.0 / 4) * after[f"{q}/kernel_lora_a"] @ after[f"{q}/kernel_lora_b"]
  np.testing.assert_allclose(merged, want, rtol=1e-6, atol=1e-7)
  assert "kernel_lora_a" not in run.decoder.params["layers_1"]["attn"]["query"]
  [c] = run.decoder.generate([run.encode_prompt("the model")], run_dir.decode.Sampling(4, 0.0))
  assert len(c.tokens) > 0


def _instruction_file(directory, n=40):
  rng = np.random.default_rng(0)
  path = os.path.join(directory, "pairs.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      a, b = int(rng.integers(10, 99)), int(rng.integers(10, 99))
      f.write(json.dumps({"prompt": f"what is {a} plus {b}? ", "completion": f"{a + b}, says the model."}) + "\n")
  return path


def test_instruction_tuning_masks_the_prompt_through_packing_and_the_gradient(tmp_path):
  config = tiny_config(data_dir=str(tmp_path / "tfds"))
  config.data.update(dataset="instructions", path=_instruction_file(str(tmp_path)), chat_template="Q: {prompt}\nA: ")
  corpus = corpus_for(config)
  tok = corpus.tokenizer
  # The mask travels with the tokens: a row's weighted targets are exactly the completions (+ EOS).
  batch, _ = next(iter(pipeline.eval_batches(corpus.train, seq_len=64, global_batch=1)))
  first = corpus.train.source.get([0])[0]
  # The prompt as the template writes it (the server's chat completions write a message the same way).
  prompt = [int(i) for i in tok.encode_batch([f"Q: {first['prompt'].decode()}\nA: "])[0]]
  completion = [int(i) for i in tok.encode_batch([first["completion"].decode()])[0]]
  n = len(prompt) + len(completion) + 1
  assert batch["targets"][0, :n].tolist() == prompt + completion + [tok.eos_id]
  assert batch["loss_mask"][0, :n].tolist() == [0] * len(prompt) + [1] * (len(completion) + 1)
  # Bits per byte are over the completions' bytes.
  assert int(batch["num_bytes"][0]) >= len(first["completion"])
  # Prompt positions get exactly zero gradient.
  rows = next(pipeline.train_iter(corpus.train, seq_len=64, global_batch=2, seed=0))
  rows = {k: jnp.asarray(v) for k, v in rows.items()}
  logits = jax.random.normal(jax.random.key(0), (*rows["targets"].shape, 384))
  grad = jax.grad(lambda lg: losses.cross_entropy_sum(lg, rows["targets"], losses.token_weights(rows))[0])(logits)
  in_prompt = rows["loss_mask"] == 0
  assert float(jnp.abs(grad[in_prompt]).max()) == 0.0 and float(jnp.abs(grad[~in_prompt]).min()) > 0


def test_classification_metrics_match_scikit_learn():
  from sklearn import metrics as sk

  rng = np.random.default_rng(0)
  true, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
  pred[:80] = true[:80]
  pred[pred == 3] = 2  # class 3 never predicted: precision 0, as zero_division=0
  confusion = np.zeros((4, 4))
  np.add.at(confusion, (true, pred), 1)
  m = classification.classification_metrics(confusion, class_names=("a", "b", "c", "d"))
  p, r, f, s = sk.precision_recall_fscore_support(true, pred, labels=range(4), zero_division=0)
  assert m["eval_accuracy"] == pytest.approx(sk.accuracy_score(true, pred))
  assert m["eval_macro_f1"] == pytest.approx(sk.f1_score(true, pred, average="macro", zero_division=0))
  assert m["eval_macro_precision"] == pytest.approx(p.mean()) and m["eval_macro_recall"] == pytest.approx(r.mean())
  for i, name in enumerate("abcd"):
    got = m["eval_per_class"][name]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
  assert m["eval_confusion"] == sk.confusion_matrix(true, pred, labels=range(4)).tolist()


@pytest.mark.slow
def test_a_classifier_trains_on_stdlib_functions_from_a_pretrained_run(trained_run, tmp_path, data_dir):
  config = _finetune_config("", data_dir, trained_run)
  config.task.kind = "classification"
  config.data.update(dataset="stdlib_functions", max_documents=400, seq_len=64)
  config.num_train_steps = 6
  workdir = str(tmp_path / "cls")
  result = loop.train_and_evaluate(config, workdir)
  assert 0 <= result["eval_accuracy"] <= 1 and len(result["eval_confusion"]) == 10
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert "accuracy" in records[0] and records[-1]["eval_per_class"].keys() == set(
      sources.open_splits(config.data).class_names)


def test_mistakes_in_fine_tuning_configs_are_one_line(trained_run, corpus_dir, data_dir, tmp_path):
  from tpu_lm.config import checks

  config = _finetune_config(corpus_dir, data_dir, str(tmp_path / "missing"))
  with pytest.raises(UserError, match="has no checkpoints/ directory"):
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  config = _finetune_config(corpus_dir, data_dir, trained_run, freeze=(".*",))
  with pytest.raises(UserError, match="freezes every parameter"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  config = _finetune_config(corpus_dir, data_dir, trained_run, freeze=("layers_[0-",))
  with pytest.raises(UserError, match="optim.freeze .* is not a regular expression"):
    checks.validate(config)
  config = tiny_config(corpus_dir, data_dir)
  config.task.kind = "classification"
  with pytest.raises(UserError, match="needs a dataset with labels"):
    checks.validate(config)
