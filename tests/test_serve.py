"""The real server in a subprocess, driven over HTTP on localhost."""

import concurrent.futures
import glob
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tpu_lm.inference import decode, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-tpu-lm-test"  # the module's server requires it (TPU_LM_API_KEY)
AUTH = {"Authorization": f"Bearer {KEY}"}


def _start(workdir, *flags, env=None):
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1", **(env or {})}
  proc = subprocess.Popen(
      [sys.executable, "-m", "tpu_lm.serve", f"--workdir={workdir}", "--port=0", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  line = proc.stdout.readline()  # blocks until the server listens (or dies)
  match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
  if not match:
    proc.kill()
    raise AssertionError(f"server did not start: {line}{proc.stderr.read()[-3000:]}")
  return proc, int(match.group(1))


@pytest.fixture(scope="module")
def server(trained_run):
  proc, port = _start(trained_run, "--max_prompt_tokens=40", "--max_new_tokens=48", "--max_body_bytes=4000",
                      "--max_batch=8", env={"TPU_LM_API_KEY": KEY})
  yield port
  proc.terminate()
  assert proc.wait(timeout=30) == 0  # SIGTERM shuts it down cleanly, saying what it did with requests
  assert "server stopped: 0 in-flight requests finished; 0 cancelled after the 30 s grace;" in proc.stdout.read()
  proc.stdout.close()
  proc.stderr.close()


@pytest.fixture(scope="module")
def local(trained_run):
  """The same run in this process, on one device like the server: the expected outputs."""
  return run_dir.load(trained_run, devices=jax.devices()[:1])


def _post(port, body, path="/v1/completions", method="POST", headers=AUTH):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  conn.request(method, path, body=body if isinstance(body, (bytes, str)) else json.dumps(body),
               headers={"Content-Type": "application/json", **headers})
  resp = conn.getresponse()
  data = resp.read().decode()
  conn.close()
  return resp.status, data


def _expected(local, prompt, **sampling):
  [c] = local.decoder.generate([local.encode_prompt(prompt)], decode.Sampling(**sampling))
  return local.tokenizer.decode(c.tokens), c.finish_reason


def test_health(server):
  status, data = _post(server, None, "/health", "GET", headers={})  # open without the key
  assert status == 200
  assert json.loads(data)["status"] == "ok"


def test_the_api_key_from_the_environment_guards_every_route_but_health(server):
  for headers in ({}, {"Authorization": "Bearer wrong"}):
    for path, method in (("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
      status, data = _post(server, {"prompt": "a"}, path, method, headers=headers)
      assert status == 401 and "a valid API key is required" in json.loads(data)["error"]["message"], data


def test_completion_is_what_the_model_generates(server, local):
  status, data = _post(server, {"prompt": "the model", "max_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": 5})
  assert status == 200, data
  out = json.loads(data)
  text, reason = _expected(local, "the model", max_new_tokens=12, temperature=0.9, top_k=20, seed=5)
  assert out["choices"] == [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]
  assert out["object"] == "text_completion"
  assert out["usage"]["prompt_tokens"] == len("the model")  # byte tokenizer: one token per byte


def test_streaming_sends_the_same_text_as_events(server, local):
  conn = http.client.HTTPConnection("127.0.0.1", server, timeout=120)
  conn.request("POST", "/v1/completions", body=json.dumps(
      {"prompt": "a little", "max_tokens": 10, "temperature": 0, "stream": True}), headers=AUTH)
  resp = conn.getresponse()
  assert resp.status == 200
  assert resp.getheader("Content-Type") == "text/event-stream"
  events = [line[len("data: "):] for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
  conn.close()
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
  assert len(chunks) > 2  # several events, not one
  text, reason = _expected(local, "a little", max_new_tokens=10, temperature=0)
  assert "".join(c["text"] for c in chunks) == text
  assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [reason]


def test_concurrent_clients_each_get_their_own_completion(server, local):
  requests = [{"prompt": f"the loss {i}", "max_tokens": 6 + i, "temperature": 1.0, "seed": i} for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    replies = list(pool.map(lambda r: _post(server, r), requests))
  for r, (status, data) in zip(requests, replies):
    assert status == 200, data
    text, _ = _expected(local, r["prompt"], max_new_tokens=r["max_tokens"], temperature=1.0, seed=r["seed"])
    assert json.loads(data)["choices"][0]["text"] == text


def test_n_and_a_list_of_prompts_give_one_choice_each(server):
  status, data = _post(server, {"prompt": ["a", "b"], "n": 2, "max_tokens": 4, "seed": 1})
  assert status == 200, data
  assert [c["index"] for c in json.loads(data)["choices"]] == [0, 1, 2, 3]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({"max_tokens": 3}, 400, "'prompt' is required"),
    ({"prompt": "a", "max_tokens": True}, 400, "'max_tokens' must be an integer from 1 to 48"),
    ({"prompt": "a", "max_tokens": 49}, 400, "'max_tokens' must be an integer from 1 to 48"),
    ({"prompt": "a", "temperature": -1}, 400, "'temperature' must be a number from 0 to 100"),
    ({"prompt": "a", "top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
    ({"prompt": "x" * 41}, 400, "prompt 0 has 41 tokens; this server accepts at most 40"),
    ({"prompt": "x" * 40, "max_tokens": 30}, 400, "exceeds the model's context of 64 tokens"),
    ({"prompt": "a", "logprobs": 6}, 400, "'logprobs' must be an integer from 0 to 5"),
    ({"prompt": "a", "max_tokens": 0}, 400, "'max_tokens' must be an integer from 1 to 48"),  # 0: with echo only
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be a non-empty string or a list of at most 4"),
    ({"prompt": "a", "n": 9}, 400, "'n' must be an integer from 1 to 8"),
    ({"prompt": "x" * 5000}, 413, "the limit is 4000"),
    ({"prompt": [5, 259]}, 400, "prompt 0 holds 259 at position 1: a token id is an integer in [0, 259)"),
    ({"prompt": [[5], []]}, 400, "prompt 1 must be a non-empty list of token ids; got []."),
    ({"prompt": []}, 400, "'prompt' is an empty list: send at least one prompt."),
    ({"prompt": ["a", [5]]}, 400, "'prompt' mixes strings and token ids: send one kind in a request."),
    ({"prompt": [[5], [5] * 41]}, 400, "prompt 1 has 41 tokens; this server accepts at most 40"),
    ({"prompt": [[5], [5] * 40], "max_tokens": 30}, 400, "prompt 1: the prompt (40 tokens) plus max_new_tokens (30)"),
    ({"prompt": "a", "suffix": "b"}, 400, "this run was not trained to fill in the middle (task.kind='lm')"),
], ids=["json", "not_object", "no_prompt", "bool_int", "too_many_tokens", "temperature", "top_p",
        "prompt_too_long", "context", "logprobs", "zero_tokens_without_echo", "stop", "n", "body_too_big",
        "id_out_of_vocab", "ids_empty", "prompt_empty", "mixed", "ids_too_long", "ids_context", "suffix_not_fim"])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, message):
  got, data = _post(server, body)
  assert got == status, data
  error = json.loads(data)["error"]
  assert message in error["message"]
  assert _post(server, None, "/health", "GET")[0] == 200


def test_stop_sequences_cut_the_text_streamed_or_not_and_echo_repeats_the_prompt(server, local):
  full, _ = _expected(local, "the model", max_new_tokens=24, temperature=0)
  stop = full[5:7]  # a piece from the middle: the text must end just before its first occurrence
  want = full[: full.index(stop)]
  request = {"prompt": "the model", "max_tokens": 24, "temperature": 0, "stop": [stop, "\u0000never"]}
  status, data = _post(server, request)
  assert status == 200, data
  assert json.loads(data)["choices"][0]["text"] == want
  assert json.loads(data)["choices"][0]["finish_reason"] == "stop"
  conn = http.client.HTTPConnection("127.0.0.1", server, timeout=120)
  conn.request("POST", "/v1/completions", body=json.dumps({**request, "stream": True, "echo": True}), headers=AUTH)
  events = [e[len("data: "):] for e in conn.getresponse().read().decode().split("\n\n") if e.startswith("data: ")]
  conn.close()
  chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
  assert "".join(c["text"] for c in chunks) == "the model" + want
  assert chunks[-1]["finish_reason"] == "stop"


def test_the_official_openai_client_works_against_the_server(server, local):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)
  [model] = client.models.list().data
  text, reason = _expected(local, "a little", max_new_tokens=8, temperature=0)
  out = client.completions.create(model=model.id, prompt="a little", max_tokens=8, temperature=0)
  assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason)
  streamed = client.completions.create(model=model.id, prompt="a little", max_tokens=8, temperature=0, stream=True)
  assert "".join(chunk.choices[0].text for chunk in streamed) == text
  scored = client.completions.create(model=model.id, prompt="a little", max_tokens=8, temperature=0, logprobs=3)
  lp = scored.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens
  for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the likeliest
    assert len(top) <= 3 and chosen == pytest.approx(max(top.values())) and chosen < 0
  with pytest.raises(openai.BadRequestError, match="this run has no chat template"):
    client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}])
  with pytest.raises(openai.AuthenticationError, match="a valid API key is required"):
    openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_embeddings_are_the_unit_mean_of_the_final_hidden_states_for_text_and_token_ids(server, local):
  openai = pytest.importorskip("openai")
  import base64

  import jax.numpy as jnp

  client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)
  texts = ["def add(a, b):", "a"]
  out = client.embeddings.create(model="m", input=texts)
  ids = [local.encode_prompt(t) for t in texts]
  assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens == sum(map(len, ids))
  for d, one in zip(out.data, ids):  # alone, unpadded: the mean of its states, normalised
    hidden = local.decoder.model.apply({"params": local.decoder.params}, jnp.asarray([one]),
                                       jnp.ones((1, len(one)), jnp.int32), jnp.arange(len(one))[None],
                                       method="hidden").astype(jnp.float32)[0]
    want = np.asarray(hidden.mean(0) / jnp.linalg.norm(hidden.mean(0)))
    np.testing.assert_allclose(d.embedding, want, atol=2e-3)  # padded to a bucket in a batch of two
  assert abs(np.linalg.norm(out.data[0].embedding) - 1) < 1e-5
  status, data = _post(server, {"input": ids[0], "encoding_format": "base64"}, "/v1/embeddings")
  assert status == 200, data
  raw = np.frombuffer(base64.b64decode(json.loads(data)["data"][0]["embedding"]), "<f4")
  np.testing.assert_allclose(raw, out.data[0].embedding, atol=1e-6)  # token ids as sent: the same text
  for body, message in [({}, "'input' is required"), ({"input": []}, "'input' is required"),
                        ({"input": ["a"] * 9}, "'input' holds 9 inputs, more than this server's 8 (--max_batch)"),
                        ({"input": [10**6]}, "input 0 holds 1000000 at position 0"),
                        ({"input": "a", "dimensions": 8}, "'dimensions' is not supported"),
                        ({"input": "a", "encoding_format": "int8"}, "'encoding_format' must be \"float\" or")]:
    status, data = _post(server, body, "/v1/embeddings")
    assert status == 400 and message in json.loads(data)["error"]["message"], (body, data)


def test_prompt_scoring_is_the_models_own_token_nll_and_transformers(server, local, trained_run, tmp_path):
  """echo + logprobs with max_tokens 0 (what evaluation harnesses send): the prompt's
  tokens with their log-probabilities given the run's BOS before them, through the
  official client; equal to the model's token NLL (the training loss's cross-entropy)
  and to transformers' log-probabilities on the exported run. The same ids sent as
  token ids (BOS included: taken as sent) echo the BOS too, its log-probability null."""
  openai = pytest.importorskip("openai")
  import optax
  import torch
  import transformers

  from tpu_lm.interop import hf

  client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)
  text = "the model reads a token"
  out = client.completions.create(model="m", prompt=text, echo=True, logprobs=2, max_tokens=0)
  [choice] = out.choices
  lp = choice.logprobs
  ids = local.encode_prompt(text)
  assert choice.text == text and out.usage.completion_tokens == 0
  assert "".join(lp.tokens) == text and len(lp.tokens) == len(ids) - 1 and lp.text_offset[0] == 0
  assert out.usage.prompt_tokens == len(ids) - 1
  served = np.array(lp.token_logprobs)
  as_ids = client.completions.create(model="m", prompt=ids, echo=True, logprobs=2, max_tokens=0).choices[0]
  assert as_ids.text == text and as_ids.logprobs.tokens == ["", *lp.tokens]
  assert as_ids.logprobs.token_logprobs == [None, *lp.token_logprobs]
  assert as_ids.logprobs.top_logprobs == [None, *lp.top_logprobs]
  logits = local.decoder.model.apply({"params": local.decoder.params}, np.array([ids]), np.ones((1, len(ids)), np.int32),
                                     np.arange(len(ids))[None])
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], np.array(ids[1:])))
  np.testing.assert_allclose(served, -nll, atol=1e-4)
  hf.export_model(trained_run, str(tmp_path / "hf"))
  with torch.no_grad():
    theirs = torch.log_softmax(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(
        torch.tensor([ids])).logits[0, :-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
  np.testing.assert_allclose(served, theirs, atol=1e-4)
  # With generation after it: the prompt's entries, then the new tokens'.
  both = client.completions.create(model="m", prompt=text, echo=True, logprobs=1, max_tokens=3, temperature=0)
  assert both.choices[0].logprobs.token_logprobs[:len(ids) - 1] == lp.token_logprobs
  assert len(both.choices[0].logprobs.tokens) == len(ids) - 1 + both.usage.completion_tokens


def test_wrong_route_method_and_missing_length(server):
  assert _post(server, {"prompt": "a"}, "/v1/chat")[0] == 404
  assert _post(server, {"prompt": "a"}, "/v1/completions", "PUT")[0] == 405
  with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % KEY.encode())
    assert b" 411 " in s.recv(4096).split(b"\r\n")[0] + b" "


def test_a_request_that_outlives_its_timeout_gets_504(trained_run):
  proc, port = _start(trained_run, "--request_timeout_s=0.01")
  try:
    status, data = _post(port, {"prompt": "the", "max_tokens": 40})
    assert status == 504, data
    assert "did not finish within 0.01 s" in json.loads(data)["error"]["message"]
    assert _post(port, None, "/health", "GET")[0] == 200
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.parametrize("flags, message", [
    (["--tensor_parallel=0"], "--tensor_parallel=0 is invalid: it must be at least 1."),
    (["--header_timeout_s=0"], "--header_timeout_s=0.0 is invalid: it must be positive."),
    (["--max_connections_per_client=-1"], "--max_connections_per_client=-1 is invalid"),
    (["--api_key=two words"], "the API key (--api_key or TPU_LM_API_KEY) must be printable ASCII without spaces"),
], ids=["tensor_parallel", "header_timeout", "per_client", "api_key"])
def test_bad_flags_are_one_line_and_exit_2(flags, message):  # refused before the run is read
  out = subprocess.run([sys.executable, "-m", "tpu_lm.serve", "--workdir=/nonexistent/run", *flags], cwd=ROOT,
                       env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.splitlines() == [f"error: {out.stderr[7:].strip()}"], out.stderr
  assert message in out.stderr


@pytest.fixture(scope="module")
def chat_server(trained_run, tmp_path_factory):
  """The trained run as if instruction-tuned with a template (its saved config says so),
  served in this process."""
  from tpu_lm.inference.engine import Engine
  from tpu_lm.serving.app import create_app
  from tpu_lm.serving.requests import Limits
  from tpu_lm.serving.server import Server

  workdir = str(tmp_path_factory.mktemp("chat") / "run")
  shutil.copytree(trained_run, workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata")):
    with open(path) as f:
      config = json.load(f)
    config["data"].update(dataset="instructions", path="pairs.jsonl", chat_template="Q: {prompt}\nA:")
    with open(path, "w") as f:
      json.dump(config, f)
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  limits = Limits(max_prompt_tokens=56, max_new_tokens=16, max_body_bytes=4000, timeout_s=60, max_batch=4)
  engine = Engine(run, 4)
  server = Server(create_app(run, engine, limits), "127.0.0.1", 0, max_connections=8, max_per_client=8,
                  header_timeout_s=5, write_timeout_s=30)
  with server.started():
    yield server.address[1], run
  engine.close(0)


def test_chat_completions_render_the_conversation_through_the_runs_template(chat_server):
  openai = pytest.importorskip("openai")
  port, run = chat_server
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
  # One user message is exactly an instruction-tuning prompt: the completion of the templated text.
  text, reason = _expected(run, "Q: add 2\nA:", max_new_tokens=8, temperature=0)
  out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "add 2"}], max_tokens=8,
                                       temperature=0)
  assert out.object == "chat.completion"
  assert (out.choices[0].message.role, out.choices[0].message.content) == ("assistant", text)
  assert out.choices[0].finish_reason == reason
  streamed = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "add 2"}], max_tokens=8,
                                            temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
  # Earlier turns and a system message are folded into the one templated prompt.
  history = [{"role": "system", "content": "b"}, {"role": "user", "content": "h"},
             {"role": "assistant", "content": "y"}, {"role": "user", "content": "add 2"}]
  text, _ = _expected(run, "Q: System: b\nUser: h\nAssistant: y\nadd 2\nA:", max_new_tokens=6,
                      temperature=0)
  out = client.chat.completions.create(model="m", messages=history, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
  assert out.choices[0].message.content == text
  assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
  assert all(len(t.top_logprobs) == 2 for t in out.choices[0].logprobs.content)
  for bad, message in (([{"role": "assistant", "content": "x"}], "the last message must be the user's"),
                       ([{"role": "robot", "content": "x"}], "messages[0] must be an object with a role")):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
      client.chat.completions.create(model="m", messages=bad)


# lm-evaluation-harness against the server: a multiple-choice (log-likelihood) task and a
# generation task over documents of the test corpus's words, as YAML tasks of local JSONL.
_LM_EVAL_TASKS = {
    "words_choice": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list: [{metric: acc}]
""",
    "words_continue": """
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: false, temperature: 0}
metric_list: [{metric: exact_match}]
""",
}


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
  """lm-eval's task manager with the two tasks; the documents as {task: [doc, ...]}."""
  from tests.conftest import WORDS

  directory = tmp_path_factory.mktemp("lm_eval_tasks")
  docs = {"words_choice": [{"context": " ".join(WORDS[i:i + 3]), "label": i % 3,
                            "choices": [WORDS[(i + 3 + 5 * ((c - i) % 3)) % len(WORDS)] for c in range(3)]}
                           for i in range(4)],
          "words_continue": [{"context": " ".join(WORDS[i:i + 3]), "target": " " + WORDS[i + 3]} for i in range(3)]}
  from lm_eval.tasks import TaskManager

  from tpu_lm.harness.benchmarks import write_local_task

  for name, body in _LM_EVAL_TASKS.items():
    write_local_task(str(directory), name, docs[name], body)

  return TaskManager(include_path=str(directory), include_defaults=False), docs  # not lm-eval's thousands


def _lm_eval(model, model_args, task, manager, **kwargs):
  import lm_eval

  out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager,
                                log_samples=True, **kwargs)
  return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_log_likelihoods_are_the_runs_scores_with_token_ids_or_text(server, local, lm_eval_tasks,
                                                                             monkeypatch):
  """local-completions with token-id requests (the server's remote tokenizer: no BOS,
  as lm-eval sends them) and with text (the server puts the run's BOS before it): each
  choice's log-likelihood is run.score's over the ids the server read, the accuracy
  what they imply."""
  from tpu_lm.data import tokenizer as tokenizer_lib
  from tpu_lm.harness.model import TpuLM

  manager, docs = lm_eval_tasks
  monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's completions send it; its remote tokenizer, auth_token
  # The parity of the three paths: the native model (tpu_lm/harness) reads text as the
  # server does; tests/test_harness.py holds it equal to lm-eval's hf backend.
  native, native_samples = _lm_eval(TpuLM(local, batch_size=4), None, "words_choice", manager)
  for tokenized, before in ((True, []), (False, [local.tokenizer.bos_id])):
    args = {"base_url": f"http://127.0.0.1:{server}/v1/completions", "model": "m", "auth_token": KEY,
            "tokenized_requests": tokenized, "batch_size": 4, "max_length": 64}
    results, samples = _lm_eval("local-completions", args, "words_choice", manager)
    correct = []
    for sample, doc in zip(samples, docs["words_choice"]):
      want = []
      for context, continuation in sample["arguments"]:  # lm-eval's (context, " " + choice)
        context = before + tokenizer_lib.encode_text(local.tokenizer, context)
        scored = local.score([context + tokenizer_lib.encode_text(local.tokenizer, continuation)])[0]
        want.append(float(np.sum(scored.logprobs[len(context) - 1:])))
      got = [ll for ll, _ in sample["filtered_resps"]]
      np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"tokenized_requests={tokenized}")
      correct.append(int(np.argmax(want)) == doc["label"])
    assert results["acc,none"] == pytest.approx(np.mean(correct))
  np.testing.assert_allclose([[ll for ll, _ in s["filtered_resps"]] for s in native_samples],
                             [[ll for ll, _ in s["filtered_resps"]] for s in samples], atol=1e-4)  # text requests
  assert native["acc,none"] == results["acc,none"]


def test_lm_eval_generations_are_the_runs_through_completions_and_chat(server, chat_server, local, lm_eval_tasks,
                                                                       monkeypatch):
  """generate_until through local-completions (token-id requests) and
  local-chat-completions (the conversation through the run's chat template): each
  answer is the run's greedy continuation, cut at the task's stop."""
  manager, docs = lm_eval_tasks
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  port, chat_run = chat_server
  for model, url, run, template in (
      ("local-completions", f"http://127.0.0.1:{server}/v1/completions", local, "{prompt}"),
      ("local-chat-completions", f"http://127.0.0.1:{port}/v1/chat/completions", chat_run, "Q: {prompt}\nA:")):
    args = {"base_url": url, "model": "m", "auth_token": KEY, "max_length": 64}
    _, samples = _lm_eval(model, args, "words_continue", manager, apply_chat_template=model.endswith("chat-completions"))
    prompts = [template.replace("{prompt}", doc["context"]) for doc in docs["words_continue"]]
    # Token ids as sent (no BOS) to completions; chat's text gets the run's BOS.
    ids = [run.encode_prompt(p) if "chat" in model else list(map(int, run.tokenizer.encode_batch([p])[0]))
           for p in prompts]
    want = run.decoder.generate(ids, decode.Sampling(max_new_tokens=6, temperature=0))  # batched: as alone
    assert [s["resps"] for s in samples] == [[[run.tokenizer.decode(c.tokens).split("\n")[0]]] for c in want], model


def test_the_tokenizer_routes_tokenize_as_the_server_does(chat_server):
  """vLLM's /tokenizer_info, /tokenize and /detokenize: the end-of-sequence string
  tokenizes to its id (how lm-eval finds it), special tokens added are what a text
  prompt becomes, and the Jinja chat template renders what chat completions feed the model."""
  from lm_eval.utils import env

  port, run = chat_server
  status, data = _post(port, None, "/tokenizer_info", "GET")
  info = json.loads(data)
  assert status == 200 and (info["eos_token_id"], info["bos_token_id"]) == (run.tokenizer.eos_id, run.tokenizer.bos_id)
  assert info["max_model_len"] == run.decoder.max_len
  tokenize = lambda body: json.loads(_post(port, body, "/tokenize")[1])  # noqa: E731
  assert tokenize({"prompt": info["eos_token"], "add_special_tokens": False})["tokens"] == [run.tokenizer.eos_id]
  out = tokenize({"prompt": "a token"})
  assert out == {"tokens": run.encode_prompt("a token"), "count": 8, "max_model_len": run.decoder.max_len}
  assert json.loads(_post(port, {"tokens": out["tokens"]}, "/detokenize")[1]) == {"prompt": "a token"}
  messages = [{"role": "system", "content": "b"}, {"role": "user", "content": "add 2"}]
  assert env.from_string(info["chat_template"]).render(messages=messages) == run.objective.chat_prompt(messages)
  status, data = _post(port, {"tokens": [1, run.tokenizer.vocab_size]}, "/detokenize")
  assert status == 400 and "'tokens' holds 259 at position 1" in json.loads(data)["error"]["message"]


@pytest.mark.slow  # another server process
def test_a_server_with_a_draft_model_answers_what_the_model_alone_does_and_counts_acceptance(trained_run, local):
  # The run is its own draft: every proposal is accepted.
  proc, port = _start(trained_run, f"--draft_workdir={trained_run}", "--draft_tokens=3", "--max_batch=4")
  try:
    body = {"prompt": ["the model", "a"], "max_tokens": 10, "temperature": 0}
    status, data = _post(port, body)
    assert status == 200, data
    out = json.loads(data)
    assert [c["text"] for c in out["choices"]] == [_expected(local, p, max_new_tokens=10, temperature=0)[0]
                                                   for p in body["prompt"]]
    usage = out["usage"]["speculative"]
    assert usage["draft_tokens"] == 3 and usage["accepted"] == usage["proposed"] > 0
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    logged = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(line.get("speculative", {}).get("proposed") for line in logged), logged  # the access log counts
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.slow  # a server process of its own
def test_sigterm_lets_requests_in_flight_finish_or_cancels_them_and_says_which(trained_run):
  """SIGTERM during a request: with a grace, it finishes (200) and the report names it;
  with none, it is cancelled (503) and the report says so; new connections are refused
  meanwhile and the process exits 0."""
  for grace, status, said in ((30, 200, "1 in-flight request finished (cmpl-"), (0, 503, "1 cancelled after the 0 s")):
    proc, port = _start(trained_run, f"--shutdown_grace_s={grace}", "--max_new_tokens=60")
    try:
      answer = {}
      body = {"prompt": "the", "max_tokens": 60, "temperature": 0}
      thread = threading.Thread(target=lambda: answer.setdefault("reply", _post(port, body, headers={})))
      thread.start()
      deadline = time.time() + 60
      while json.loads(_post(port, None, "/health", "GET")[1])["running"] == 0 and time.time() < deadline:
        time.sleep(0.005)
      proc.terminate()
      thread.join(60)
      got, data = answer["reply"]
      assert got == status, data
      assert proc.wait(timeout=60) == 0
      out = proc.stdout.read()
      assert said in out, out
    finally:
      proc.kill()
      proc.wait()
      proc.stdout.close()
      proc.stderr.close()
