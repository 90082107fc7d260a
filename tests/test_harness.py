"""lm-evaluation-harness with a tpu_lm run as its model: the same numbers as lm-eval's
`hf` backend on the exported run, from the command line, and during training.
(The server path, lm_eval --model local-completions: tests/test_serve.py.)"""

import json
import os
import subprocess
import sys

import jax
import lm_eval
import numpy as np
import pytest

from tests.conftest import tiny_config, write_harness_tasks
from tpu_lm.errors import UserError
from tpu_lm.harness import benchmarks
from tpu_lm.inference import run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_harness_tasks(tmp_path_factory.mktemp("harness_tasks"))


@pytest.fixture(scope="module")
def native(trained_run, task_dir):
  """The three request kinds through the native model, every sample logged."""
  from tpu_lm.harness.model import TpuLM

  run = run_dir.load(trained_run, devices=jax.devices()[:1])
  names, manager = benchmarks.resolve("next_word,text_ppl,continue_text", task_dir)
  results = benchmarks.evaluate(TpuLM(run, batch_size=4), names, manager, log_samples=True, bootstrap_iters=0)
  return run, manager, results


def _responses(results, task):
  """Per document (in order), its requests' responses: [(loglikelihood, is_greedy), ...]
  for multiple choice, [loglikelihood] for a rolling text."""
  return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_a_loglikelihood_is_the_scoring_functions_and_greedy_means_argmax(native):
  run, _, results = native
  [first, *_] = sorted(results["samples"]["next_word"], key=lambda s: s["doc_id"])
  doc = first["doc"]
  for choice, (ll, greedy) in zip(doc["choices"], (r[0] for r in first["resps"])):
    ctx, whole = run.encode_prompt(doc["context"]), run.encode_prompt(doc["context"] + " " + choice)
    [scored] = run.score([whole], top=1)
    n = len(whole) - len(ctx)
    assert ll == pytest.approx(float(scored.logprobs[-n:].sum()), abs=1e-5)
    assert greedy == bool((scored.top_ids[-n:, 0] == whole[-n:]).all())
  chosen = [int(np.argmax([ll for ll, _ in r])) for r in _responses(results, "next_word")]
  golds = [s["doc"]["gold"] for s in sorted(results["samples"]["next_word"], key=lambda s: s["doc_id"])]
  assert results["results"]["next_word"]["acc,none"] == pytest.approx(np.mean(np.array(chosen) == golds))
  # A rolling text is every token given BOS and the ones before it, each once.
  [text_doc] = [s for s in results["samples"]["text_ppl"] if s["doc_id"] == 0]
  ids = run.encode_prompt(text_doc["doc"]["text"])
  assert text_doc["resps"][0][0] == pytest.approx(float(run.score([ids])[0].logprobs.sum()), abs=1e-4)
  # Generation stops at the task's newline and reports text, for every document.
  generated = [s["resps"][0][0] for s in results["samples"]["continue_text"]]
  assert len(generated) == 8 and all(isinstance(g, str) and "\n" not in g for g in generated)


def test_native_equals_lm_evals_hf_backend_on_the_exported_run(native, trained_run, tmp_path):
  """Parity: every request's log-likelihood within 1e-4 and the same accuracies, as
  transformers computes them through lm-eval's own `hf` backend."""
  from tpu_lm.interop import hf

  _, manager, ours = native
  hf.export_model(trained_run, str(tmp_path / "hf"))
  args = f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu,batch_size=4"
  # hf prepends BOS to contexts with add_bos_token=True (as our runs read text); its
  # rolling windows would then score a second BOS, so texts are compared without it.
  for task, bos in (("next_word", True), ("text_ppl", False)):
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"{args},add_bos_token={bos}", tasks=[task],
                                     task_manager=manager, log_samples=True, bootstrap_iters=0)
    a, b = _responses(ours, task), _responses(theirs, task)
    if task == "next_word":
      np.testing.assert_allclose([[ll for ll, _ in r] for r in a], [[ll for ll, _ in r] for r in b], atol=1e-4)
      assert [[g for _, g in r] for r in a] == [[bool(g) for _, g in r] for r in b]
      for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task][metric] == theirs["results"][task][metric]
    else:
      np.testing.assert_allclose(a, b, atol=1e-4)
      assert ours["results"][task]["bits_per_byte,none"] == pytest.approx(
          theirs["results"][task]["bits_per_byte,none"], abs=1e-5)


def test_task_files_are_checked_before_any_work(task_dir, tmp_path):
  names, _ = benchmarks.resolve(f"{task_dir}/next_word.yaml, text_ppl", task_dir)
  assert names == ["next_word", "text_ppl"]
  with pytest.raises(UserError, match=r"task file .*missing.yaml does not exist"):
    benchmarks.resolve(str(tmp_path / "missing.yaml"))
  (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
  with pytest.raises(UserError, match=r"has no `task:` name"):
    benchmarks.resolve(str(tmp_path / "nameless.yaml"))
  with pytest.raises(UserError, match=r"no harness task given"):
    benchmarks.resolve(" , ")
  with pytest.raises(UserError, match=r"lm-eval reads task files named \*.yaml only"):
    benchmarks.resolve(str(tmp_path / "task.yml"))


def test_metrics_flatten_and_directions():
  results = {"results": {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1.0}},
             "groups": {"mmlu": {"acc,none": 0.25}}}
  assert benchmarks.metrics(results) == {"harness/arc/acc": 0.5, "harness/arc/exact_match_strict": 1.0,
                                    "harness/mmlu/acc": 0.25}
  assert benchmarks.direction("harness/arc/acc") == "maximize"
  assert benchmarks.direction("harness/wikitext/word_perplexity") == "minimize"
  assert benchmarks.direction("harness/x/bits_per_byte") == "minimize"


@pytest.mark.slow
def test_the_command_prints_the_harness_table_and_keeps_its_json(trained_run, task_dir):
  env = {**os.environ, "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-m", "tpu_lm.evaluate", f"--workdir={trained_run}", "--tasks=next_word",
                        f"--include_path={task_dir}", "--limit=4", "--bootstrap_iters=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "|next_word|" in out.stdout.replace(" ", "") and "acc" in out.stdout
  written = out.stdout.strip().splitlines()[-1].removeprefix("results: ")
  saved = json.load(open(written))
  assert saved["results"]["next_word"]["sample_len"] == 4 and saved["config"]["model"] == "tpu_lm"
  assert open(os.path.join(os.path.dirname(written), "results.md")).read().startswith("|  Tasks  |")
  # A name that is no task is known only once lm-eval's whole catalog is indexed (~20 s here).
  with pytest.raises(UserError, match=r"unknown lm-eval task 'nxt_word': use a task name"):
    benchmarks.resolve("nxt_word", task_dir)


@pytest.mark.slow
def test_harness_tasks_during_training_land_in_metrics_jsonl(corpus_dir, data_dir, task_dir, tmp_path):
  from tpu_lm.training import loop

  config = tiny_config(corpus_dir, data_dir)
  config.eval_harness.tasks = "next_word"
  config.eval_harness.include_path = task_dir
  config.eval_harness.every_steps = 3
  config.eval_harness.limit = 4
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evals = [r for r in records if "eval_bpb" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(0 <= r["harness/next_word/acc"] <= 1 for r in evals)
  assert result["harness/next_word/acc"] == evals[-1]["harness/next_word/acc"]  # what a sweep optimises
  assert sorted(os.listdir(tmp_path / "run" / "harness")) == ["step_3", "step_6"]
  qat = config.copy_and_resolve_references()
  qat.quant.qat, qat.quant.weight_qtype, qat.model.scan_layers = True, "int8", False
  with pytest.raises(UserError, match="eval_harness.tasks .* the harness scores the float weights"):
    loop.train_and_evaluate(qat, str(tmp_path / "other"))
  config.eval_harness.tasks = str(tmp_path / "missing.yaml")
  with pytest.raises(UserError, match="task file .*missing.yaml does not exist"):
    loop.train_and_evaluate(config, str(tmp_path / "other"))
  assert not os.path.exists(tmp_path / "other")  # refused before anything was written
