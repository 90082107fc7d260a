"""Shared fixtures. The first lines give every test 8 fake CPU devices."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One JAX compilation cache per test session, shared by the xdist workers and the
# subprocesses they start (they inherit the environment): a run and its resume, or the
# reliability tests' reruns, compile the same train step once. A new directory each
# session (made by the first process to load this file), so the suite never reuses
# programs compiled by older code.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpu_lm_tests_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Nothing in the tests downloads: the Hugging Face libraries (datasets under lm-eval,
# transformers) read local files without first asking the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random  # noqa: E402

from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()  # as the commands do (subprocesses inherit it)

import pytest  # noqa: E402

from configs import tiny  # noqa: E402

WORDS = (
    "the model reads a token and predicts the next one while the optimizer moves each weight"
    " a little downhill on the loss so that later text becomes less surprising to it"
).split()


def write_corpus(directory, num_files: int = 24, seed: int = 0) -> str:
  """Deterministic pseudo-text files: enough to train on, small enough to be quick."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(num_files):
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(10, 30))]
    with open(os.path.join(directory, f"doc{i:03d}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return str(directory)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


# configs/tiny.py shrunk further: the same overrides serve in-process tests
# (tiny_config) and subprocess tests (tiny_flags).
TINY = {
    "num_train_steps": 6, "optim.warmup_steps": 2, "log_every_steps": 2, "eval_every_steps": 3, "checkpoint_every_steps": 3,
    "data.dataset": "text_files", "data.seq_len": 32, "data.global_batch_size": 8,
    "model.d_model": 32, "model.mlp_dim": 64, "model.max_len": 64,
    "sample.num_prompts": 1, "sample.prompt_tokens": 8, "sample.new_tokens": 8,
}


def tiny_config(corpus_dir: str = "", data_dir: str = ""):
  c = tiny.get_config()
  for dotted, value in {**TINY, "data.path": corpus_dir, "data.data_dir": data_dir}.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_flags(corpus_dir: str, data_dir: str, workdir: str) -> list[str]:
  overrides = {**TINY, "data.path": corpus_dir, "data.data_dir": data_dir}
  return [f"--workdir={workdir}", "--config=configs/tiny.py"] + [
      f"--config.{k}={v}" for k, v in overrides.items()
  ]


def cli_body(command: str, argv: list[str]) -> None:
  """Runs `tpu_lm.cli.<command>`'s body in this process with `argv`'s flags.

  Each command defines its absl flags when imported, several of them a --workdir, so two
  commands imported into one pytest worker would collide. Drop the other commands' flags
  and modules first; they define theirs again when next imported.
  """
  import importlib
  import sys

  from absl import flags

  name = f"tpu_lm.cli.{command}"
  for module, defined in list(flags.FLAGS.flags_by_module_dict().items()):
    if module.startswith("tpu_lm.cli.") and module != name:
      for flag in list(defined):  # deleting a flag edits this list
        if flag.name in flags.FLAGS:
          delattr(flags.FLAGS, flag.name)
      sys.modules.pop(module, None)
  cli = importlib.import_module(name)
  flags.FLAGS.unparse_flags()
  flags.FLAGS([command, *argv])
  try:
    cli.body()
  finally:
    flags.FLAGS.unparse_flags()


def rows_resumed(tok, encoder, **options) -> tuple[list, list]:
  """(rows 4-7 of a Loader over 40 small documents, the same rows from a Loader resumed at
  row 3's state): equal when the objective's draws are exact on resume."""
  from tpu_lm.data import stream

  source = type("Docs", (), {"__len__": lambda self: 40,
                             "get": lambda self, idx: [{"text": f"doc {i} " * (1 + i % 5)} for i in idx]})()
  opts = dict(seq_len=16, global_batch=4, seed=7, bos_id=tok.bos_id, eos_id=tok.eos_id, block_docs=4, **options)
  loader = stream.Loader(source, encoder, **opts)
  for _ in range(3):
    next(loader)
  state = loader.get_state()
  rest = [next(loader) for _ in range(4)]
  loader.close()
  resumed = stream.Loader(source, encoder, **opts)
  resumed.set_state(state)
  again = [next(resumed) for _ in range(4)]
  resumed.close()
  return rest, again


def write_harness_tasks(directory, documents: int = 8, seed: int = 0) -> str:
  """Local lm-evaluation-harness tasks over the test corpus's words, no download: a
  multiple-choice next word (next_word: loglikelihood; lm-eval puts its target_delimiter,
  a space, between context and choice), a continuation to generate
  (continue_text: generate_until, stopped at a newline) and texts to score whole
  (text_ppl: loglikelihood_rolling). Returns the folder (--include_path)."""
  from tpu_lm.harness import benchmarks

  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  words = sorted(set(WORDS))
  lines = [[rng.choice(WORDS) for _ in range(rng.randint(6, 10))] for _ in range(3 * documents)]
  rows = {"next_word": [], "continue_text": [], "text_ppl": []}
  for line in lines[:documents]:
    k = rng.randint(3, len(line) - 1)
    choices = [line[k]] + rng.sample([w for w in words if w != line[k]], 3)
    rng.shuffle(choices)
    rows["next_word"].append({"context": " ".join(line[:k]), "choices": choices,
                              "gold": choices.index(line[k])})
  for line in lines[documents:2 * documents]:
    rows["continue_text"].append({"context": " ".join(line[:4]), "target": " " + " ".join(line[4:6])})
  for line in lines[2 * documents:]:
    rows["text_ppl"].append({"text": " ".join(line)})
  kinds = {
      "next_word": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                   'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
      "continue_text": 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                       'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
                       "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
      "text_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                  "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
  }
  for name, kind in kinds.items():
    benchmarks.write_local_task(str(directory), name, rows[name], kind)
  return str(directory)


@pytest.fixture(scope="session")
def trained_run(corpus_dir, data_dir, tmp_path_factory):
  """A tiny run directory trained in-process once (checkpoint, config, tokenizer)."""
  from tpu_lm.training import loop

  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  loop.train_and_evaluate(tiny_config(corpus_dir, data_dir), workdir)
  return workdir


def train_steps(config, batches, devices):
  """Trains `config` on `batches` over `devices` (its mesh section decides the
  layout); returns (losses, gradient norms, final state on the host, setup).

  Gradient norms, not only losses, let equivalence tests see a wrong gradient
  scale: AdamW and clipping absorb any constant factor in the update."""
  import jax
  import numpy as np

  from tpu_lm.parallel import mesh as mesh_lib
  from tpu_lm.training.setup import Setup

  setup = Setup(config, mesh_lib.make_mesh(mesh_lib.mesh_sizes(config.mesh), devices))
  losses, grad_norms = [], []
  with setup.context():
    state = setup.init(jax.random.key(0))
    for b in batches:
      state, m = setup.train_step(state, setup.device_batch(b))
      losses.append(float(m["step_loss"]))
      grad_norms.append(float(m["grad_norm"]))
  return np.array(losses), np.array(grad_norms), jax.device_get(state), setup


def corpus_for(config, tokenizer=None):
  """The corpus a run of `config` trains on: its splits, read by its objective."""
  from tpu_lm import tasks
  from tpu_lm.data import sources

  splits = sources.open_splits(config.data)
  return sources.prepare(config.data, splits, tasks.from_config(config, splits.class_names), tokenizer)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it, after the workers
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
