"""A tpu_lm run as an lm-evaluation-harness model ("tpu_lm" in its registry).

The harness asks three things of a model, answered here on the accelerator:
- loglikelihood: log p(continuation | context) and whether greedy decoding would
  produce it, through the one scoring function (inference/score.py: what the server's
  echo + logprobs and the audit use), requests sorted by length and scored
  `batch_size` at a time in a few compiled shapes (powers of two), on the run's mesh;
- loglikelihood_rolling: a whole text's log-likelihood in disjoint windows of the
  model's context, as lm-eval windows it for every backend;
- generate_until: completions through the continuous-batching decoder
  (inference/complete.py), each cut at its task's stop sequences.

Texts are tokenized as the run's model saw texts begin (Run.encode_prompt: BOS first
for runs trained here, the tokenizer's own special tokens for imported ones), so the
numbers equal lm-eval's `hf` backend on the run exported with `--to_hf` (with
`add_bos_token=True`; tests/test_harness.py checks it).

Every process of a multi-host run scores every request (the compiled programs are
SPMD over the mesh), so the harness sees one rank; only process 0 writes results.
"""

import importlib

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference import complete
from tpu_lm.inference.sampling import Sampling

# lm-eval's own backends (hf, local-completions, ...): its registry imports them only while
# it is empty, which registering "tpu_lm" below would otherwise make it never be.
importlib.import_module("lm_eval.models")


@register_model("tpu_lm")
class TpuLM(TemplateLM):
  """`run` (run_dir.Run: a loaded run directory, or a training run's current
  parameters) as a harness model; or `workdir` (and `step`) to load one, as
  `lm_eval.simple_evaluate(model="tpu_lm", model_args="workdir=RUN")` does."""

  def __init__(self, run=None, workdir: str | None = None, step: int | None = None, batch_size: int | str = 16,
               max_batch: int = 8, max_gen_toks: int = 256, seed: int = 0, tensor_parallel: int = 1, **_unused):
    super().__init__()
    if run is None:
      if not workdir:
        raise UserError("the tpu_lm harness model needs a run: pass model_args='workdir=RUN'.")
      from tpu_lm.inference import run_dir

      run = run_dir.load(workdir, step=None if step is None else int(step), tensor_parallel=int(tensor_parallel))
    self.run = run
    # lm-eval's "auto" / "auto:N" searches for the largest batch that fits; the shapes here are fixed: 16.
    self.batch_size = 16 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
    self.max_batch, self.max_gen_toks, self.seed = int(max_batch), int(max_gen_toks), int(seed)
    # What an empty context is: the start of a text, as the model saw texts begin (read on every request).
    first = tokenizer_lib.encode_prompt(run.tokenizer, "")
    self._prefix_id = first[0] if first else run.tokenizer.eos_id

  # What TemplateLM needs to tokenize requests.
  @property
  def eot_token_id(self) -> int:
    return self.run.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._prefix_id

  @property
  def max_length(self) -> int:
    return self.run.decoder.max_len

  @property
  def tokenizer_name(self) -> str:
    return f"tpu_lm:{self.run.workdir}"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
    if add_special_tokens is False:  # a special token's string is that token, as Hugging Face tokenizers read text
      return tokenizer_lib.encode_text(self.run.tokenizer, string)
    ids = self.run.encode_prompt(string)
    if len(ids) > 1 and ids[0] == ids[1] == self.prefix_token_id:  # the text began with the BOS string itself
      ids = ids[1:]
    return ids

  def tok_decode(self, tokens) -> str:
    return self.run.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
    """(request key, context ids, continuation ids) -> (log-likelihood, is greedy). A
    sequence longer than the model's context keeps its last max_len + 1 tokens."""
    window = self.max_length + 1
    sequences = [(ctx + cont)[-window:] for _, ctx, cont in requests]
    for _, ctx, cont in requests:
      if not cont:
        raise UserError(f"a request has an empty continuation after tokenization (context {ctx[-8:]}...): the task's"
                        " choices must be non-empty text.")
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))  # similar lengths share a shape
    out: list = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or jax.process_index() != 0)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      scored = self.run.score([sequences[i] for i in chunk], top=1)
      for i, s in zip(chunk, scored):
        key, _, cont = requests[i]
        n = min(len(cont), len(sequences[i]) - 1)
        target = sequences[i][-n:]
        result = (float(s.logprobs[-n:].sum()), bool((s.top_ids[-n:, 0] == target).all()))
        out[i] = result
        if key is not None:
          self.cache_hook.add_partial("loglikelihood", key, result)
      bar.update(len(chunk))
    bar.close()
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood (perplexity tasks: wikitext, the Pile), scored in
    disjoint windows of the model's context, every token once."""
    windows, owner = [], []
    for i, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0], add_special_tokens=False)
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
      totals[i] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each (context, generation settings) completed by continuous batching, cut at the
    first of its `until` strings; a context too long for the model keeps its start
    token and its end (the model's context minus the tokens to generate)."""
    wanted = []
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args
      kwargs = dict(gen_kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
      greedy = not kwargs.pop("do_sample", False) or not kwargs.get("temperature", 1.0)
      sampling = Sampling(max_new, 0.0 if greedy else float(kwargs.pop("temperature", 1.0)), int(kwargs.pop("top_k", 0) or 0),
                          float(kwargs.pop("top_p", 1.0) or 1.0), (self.seed + i) % 2**32)
      ids = self.run.encode_prompt(context)
      room = self.max_length - max_new
      if len(ids) > room:
        ids = ids[:1] + ids[len(ids) - room + 1:]
      wanted.append(complete.Wanted(ids, sampling, tuple(u for u in until if u)))
    bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or jax.process_index() != 0)
    texts = complete.complete(self.run, wanted, max_batch=self.max_batch, on_done=lambda *_: bar.update(1))
    bar.close()
    for request, text in zip(requests, texts):
      self.cache_hook.add_partial("generate_until", request.args, text)
    return texts

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    """The run's own chat template (an instruction-tuned run's objective renders it)."""
    if not self.run.objective.chat:
      raise UserError(f"{self.run.workdir} has no chat template (it was not instruction-tuned): drop"
                      " --apply_chat_template.")
    return self.run.objective.chat_prompt(chat_history)
