"""The memorization audit: canaries land where the run's data.path trains on them (or
insertion refuses and leaves nothing), a run is audited only if it trained on them,
and exposure is the canary's rank in bits."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny_config, write_corpus
from tpu_lm.data import local_files
from tpu_lm.errors import UserError
from tpu_lm.privacy import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_copies(data_path, canaries):
  """Each canary's copies among the training documents, by the pipeline's functions."""
  root, rel = local_files.user_files(data_path)
  train = local_files.split_files(rel)["train"]
  return [sum((root / r).read_text() == c.text for r in train) for c in canaries]


def test_canaries_land_in_the_training_split_and_their_list_stays_out(tmp_path):
  data = write_corpus(tmp_path / "data")
  before = set(os.listdir(data))
  canaries = audit.make_canaries([1, 3, 7], seed=5)
  path = audit.insert(canaries, data)
  assert path == str(tmp_path / "data_canaries.json") and audit.read_canaries(path) == canaries
  files = sorted(set(os.listdir(data)) - before)
  assert len(files) == 11 and all(f.endswith(".py") for f in files)  # a directory reads every file
  assert _training_copies(data, canaries) == [1, 3, 7]
  with pytest.raises(UserError, match="inside the data directory"):
    audit.insert(canaries, data, os.path.join(data, "list.json"))


def test_a_txt_glob_gets_txt_canaries_in_its_training_split(tmp_path):
  data = write_corpus(tmp_path / "data")
  glob = os.path.join(data, "*.txt")
  canaries = audit.make_canaries([2, 5], seed=1)
  audit.insert(canaries, data, data_path=glob)
  new = [f for f in os.listdir(data) if f.startswith("canary_")]
  assert len(new) == 7 and all(f.endswith(".txt") for f in new)
  assert _training_copies(glob, canaries) == [2, 5]


def test_a_glob_rooted_above_the_directory_splits_by_the_path_from_its_root(tmp_path):
  corpus = tmp_path / "corpus"
  write_corpus(corpus)
  sub = write_corpus(corpus / "sub", num_files=4, seed=1)
  glob = os.path.join(corpus, "**", "*.txt")  # relative paths "sub/canary_...txt": the split hashes those
  canaries = audit.make_canaries([4, 16], seed=2)
  audit.insert(canaries, sub, data_path=glob)
  rel = [r for r in local_files.user_files(glob)[1] if "canary_" in r]
  assert len(rel) == 20 and all(r.startswith("sub/canary_") and not local_files.is_validation(r) for r in rel)
  assert _training_copies(glob, canaries) == [4, 16]


@pytest.mark.parametrize("data_path, where, fragment", [
    ("{data}/doc*.txt", "{data}", "does not read"),  # the glob's names leave the canaries out
    ("{data}", "{tmp}/elsewhere", "not {tmp}/elsewhere"),  # a directory the run never reads
    ("{tmp}", "{data}", "would read the canaries' list"),  # the list, beside the directory, in the data
    ("{data}/*.nothing", "{data}", "cannot take canaries yet"),  # nothing there to train on
    ("{data}/doc*.txt", "{data}/new", "does not read"),  # a directory made for them is removed too
])
def test_insertion_where_the_run_would_not_train_on_every_copy_is_refused_and_leaves_nothing(
    tmp_path, data_path, where, fragment):
  data = write_corpus(tmp_path / "data")
  fill = lambda s: s.format(data=data, tmp=tmp_path)  # noqa: E731
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  with pytest.raises(UserError) as e:
    audit.insert(audit.make_canaries([1, 4]), fill(where), data_path=fill(data_path))
  assert fill(fragment) in str(e.value) and "\n" not in str(e.value)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_insertion_past_max_documents_is_refused(tmp_path):
  data = write_corpus(tmp_path / "data")
  with pytest.raises(UserError, match="is not among the training documents .* --max_documents=3"):
    audit.insert(audit.make_canaries([1, 4]), data, max_documents=3)  # 5 copies
  assert not [f for f in os.listdir(data) if f.startswith("canary_")]
  # A second insertion of the same secrets would double their copies: refused, the first kept.
  canaries = audit.make_canaries([1, 4])
  path = audit.insert(canaries, data)
  with pytest.raises(UserError, match="would hold canary .* 2 times, not 1"):
    audit.insert(canaries, data)
  assert _training_copies(data, canaries) == [1, 4] and audit.read_canaries(path) == canaries


def test_only_a_run_that_trained_on_the_canaries_is_audited(tmp_path):
  data = write_corpus(tmp_path / "data")
  canaries = audit.make_canaries([1, 4])
  audit.insert(canaries, data)
  audit.check_trained_on(tiny_config(data), canaries, "RUN")  # its data.path reads every copy
  stdlib = tiny_config(data)
  stdlib.data.dataset = "python_stdlib"
  with pytest.raises(UserError, match="trained on data.dataset='python_stdlib', not text_files"):
    audit.check_trained_on(stdlib, canaries, "RUN")
  with pytest.raises(UserError, match=f"canary {canaries[0].secret} appears in 0 of the training files of RUN"):
    audit.check_trained_on(tiny_config(os.path.join(data, "*.txt")), canaries, "RUN")  # .py canaries, a *.txt run


def test_auditing_a_run_that_never_read_the_canaries_is_refused(trained_run, tmp_path):
  """The command, both ends: insertion for a '*.txt' run, then an audit of a run that
  trained elsewhere (the trained_run fixture's corpus) refused in one line."""
  data = write_corpus(tmp_path / "data")

  def command(*flags):
    return subprocess.run([sys.executable, "-m", "tpu_lm.audit", *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})

  out = command(f"--insert_into={data}", f"--data_path={data}/*.txt", "--repeats=1,4")
  assert out.returncode == 0 and "all in the training split" in out.stdout, out.stderr
  canaries = audit.read_canaries(f"{data}_canaries.json")
  assert _training_copies(f"{data}/*.txt", canaries) == [1, 4]
  out = command(f"--workdir={trained_run}", f"--canaries={data}_canaries.json")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr
  assert lines[0].startswith(f"error: canary {canaries[0].secret} appears in 0 of the training files of")
  assert "expected 1): the run did not train on these canaries" in lines[0]
  assert not os.path.exists(os.path.join(trained_run, "audit.json"))


def test_exposure_is_the_canarys_rank_in_bits(monkeypatch):
  canary = audit.Canary("0123abcd", 4)
  # A model that gives the canary the lowest log-perplexity: it ranks first of all.
  monkeypatch.setattr(audit, "log_perplexities", lambda m, texts: np.array([1.0] + list(np.linspace(20, 40, len(texts) - 1))))
  first = audit.exposure(None, canary, num_candidates=255)
  assert first["rank"] == 1 and first["exposure_sampled"] == 8.0 and first["exposure_extrapolated"] > 8.0
  # In the middle of the candidates: about one bit.
  monkeypatch.setattr(audit, "log_perplexities", lambda m, texts: np.array([30.0] + list(np.linspace(20, 40, len(texts) - 1))))
  middle = audit.exposure(None, canary, num_candidates=255)
  assert 120 < middle["rank"] < 136 and 0.9 < middle["exposure_sampled"] < 1.1 and 0.7 < middle["exposure_extrapolated"] < 1.3


@pytest.mark.slow
def test_the_audit_scores_a_real_run(trained_run, tmp_path):
  from tpu_lm.interpret import run

  m = run.load(trained_run)
  canary = audit.Canary("00ff00ff", 1)
  texts = [canary.text, audit.TEMPLATE.format("12345678")]
  scores = audit.log_perplexities(m, texts)
  # The whole text's nats: the sum of the model's per-token losses, every token predicted.
  tokens = m.encode(texts[0])
  import jax

  logits = m.model.apply({"params": m.params}, np.asarray([tokens[:-1]]), np.ones((1, len(tokens) - 1), np.int32),
                         np.arange(len(tokens) - 1)[None])
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[0])), np.asarray(tokens[1:])[:, None], 1).sum()
  np.testing.assert_allclose(scores[0], nll, rtol=1e-4)
  r = audit.exposure(m, canary, num_candidates=40)
  assert 1 <= r["rank"] <= 41 and 0 <= r["exposure_sampled"] <= np.log2(41) + 1e-9
