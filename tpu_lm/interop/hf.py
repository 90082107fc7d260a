"""Hugging Face model directories <-> tpu_lm run directories.

`import_model(src, workdir)`: a directory with `config.json`, safetensors weights and
tokenizer files (or a hub name, where a network exists) -> a run directory that
generate, serve and `init_from` accept. `export_model(workdir, dst)`: a run
directory -> a directory `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as they are (an encoder's:
`AutoModelForMaskedLM` and the `fill-mask` pipeline).

Architectures: GPT2LMHeadModel and LlamaForCausalLM (gpt2.py, llama.py); the
encoders BertForMaskedLM, BertForPreTraining, BertModel and RobertaForMaskedLM
(bert.py), imported as masked-LM runs (task.kind="mlm"), and exported with
RoFormerForMaskedLM for a rotary encoder (configs/encoder.py's). Weights
keep their values exactly: float32 in the run directory (tpu_lm's parameters are
always float32; a bfloat16 source converts losslessly), and exported in the dtype
the model came in (recorded in `hf_source.json`) or the one asked for.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np

from tpu_lm import tasks
from tpu_lm.config import defaults, derived
from tpu_lm.errors import UserError
from tpu_lm.interop import bert, gpt2, llama, safetensors_io
from tpu_lm.tasks import mlm

ARCHITECTURES = {gpt2.ARCHITECTURE: gpt2, llama.ARCHITECTURE: llama} | {f.ARCHITECTURE: f for f in bert.FAMILIES}
SOURCE_FILE = "hf_source.json"  # in a converted run: what it came from
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def resolve(src: str) -> str:
  """A local directory as it is; anything else is taken for a hub name and downloaded
  (safetensors and tokenizer files only) into the Hugging Face cache."""
  path = os.path.expanduser(src)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or src.startswith((".", "/", "~")) or src.count("/") > 1:
    raise UserError(f"--from_hf={src} is not a directory: pass a Hugging Face model directory or a hub name (gpt2).")
  try:
    import huggingface_hub

    return huggingface_hub.snapshot_download(src, allow_patterns=_HUB_FILES)
  except ImportError:
    raise UserError(f"{src!r} is not a local directory, and downloading it needs huggingface_hub:"
                    " pip install huggingface_hub, or pass a directory.") from None
  except Exception as e:  # offline, unknown repo, gated model: huggingface_hub has many error types
    raise UserError(f"could not download {src!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:160]}):"
                    " check the name and the network, or pass a local directory.") from None


def read_hf_config(directory: str) -> tuple[dict, object]:
  """(config.json, the architecture module that handles it)."""
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} is missing: pass a Hugging Face model directory (config.json, model.safetensors,"
                    " tokenizer.json).") from None
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}): download it again.") from None
  names = hf.get("architectures") or []
  arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
  if arch is None:
    raise UserError(f"{directory} holds a {', '.join(names) or hf.get('model_type', 'unknown')} model: tpu_lm"
                    f" converts {', '.join(ARCHITECTURES)}.")
  return hf, arch


def to_config(hf: dict, arch, tokenizer, dtype: str = "float32", tokenizer_path: str = ""):
  """A whole tpu_lm config (today's defaults) for this Hugging Face model."""
  config = defaults.get_config()
  try:
    fields = arch.model_fields(hf)
  except KeyError as e:
    raise UserError(f"config.json lacks {e.args[0]!r}, which a {arch.ARCHITECTURE} config has: download it again.") from None
  m = config.model
  for key, value in fields.items():
    if key == "rope_scaling":
      m.rope_scaling.update(value)
    else:
      m[key] = float(value) if isinstance(m[key], float) else value
  m.dtype = dtype
  m.remat, m.scan_layers, m.dropout_rate, m.logits_chunk = "none", False, 0.0, 0
  d = config.data
  d.tokenizer, d.tokenizer_path = "hf", tokenizer_path
  d.vocab_size = int(hf["vocab_size"])
  if tokenizer.vocab_size > d.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's embedding only {d.vocab_size}: the"
                    " tokenizer files belong to another model.")
  d.seq_len = min(d.seq_len, m.max_len)
  if isinstance(arch, bert.Family):
    config.task.kind = mlm.NAME  # an encoder: fills masks, embeds, fine-tunes; samples nothing
    config.sample.num_prompts = 0
  s = config.sample
  s.prompt_tokens = min(s.prompt_tokens, m.max_len // 2)
  s.new_tokens = min(s.new_tokens, m.max_len - s.prompt_tokens)
  return config


def import_model(src: str, workdir: str, dtype: str = "float32") -> str:
  """Writes the run directory; returns a one-line summary."""
  from tpu_lm.data import tokenizer as tokenizer_lib
  from tpu_lm.inference import run_dir

  run_dir.check_new(workdir)  # before reading (or downloading) the weights
  directory = resolve(src)
  hf, arch = read_hf_config(directory)
  tokenizer = tokenizer_lib.load_hf(directory)
  # The run keeps its own copy of the tokenizer files (tokenizer.HF_DIR).
  config = to_config(hf, arch, tokenizer, dtype,
                     os.path.join(os.path.abspath(os.path.expanduser(workdir)), tokenizer_lib.HF_DIR))
  tensors = safetensors_io.read(directory)
  source_dtype = str(next(iter(tensors.values())).dtype) if tensors else "float32"
  if arch is gpt2:
    tensors = gpt2.strip_prefix(tensors)
  elif isinstance(arch, bert.Family):
    tensors = bert.normalize_names(tensors, arch)
    tokenizer = tokenizer_lib.add_sentinels(tokenizer, (mlm.MASK,))  # its own mask token is the <mask>
  model_cfg = derived.model_config(config)
  try:
    params = arch.to_params(tensors, arch.model_fields(hf), model_cfg.vocab_size)
  except KeyError as e:
    raise UserError(f"{directory} lacks the tensor {e.args[0]!r} a {arch.ARCHITECTURE} of this config has: its"
                    " weights are incomplete or of another model.") from None
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  fresh_head = arch is bert.BERT_MODEL
  if fresh_head:
    params |= _fresh_head(model_cfg)
  _check_against_model(params, model_cfg, directory)
  # Prompted as transformers prompts it; a run fine-tuned from this one, on documents
  # packed with [BOS], records [BOS] + tokens instead.
  run_dir.write(workdir, config, params, tokenizer, prompt=tokenizer_lib.PROMPT_OWN)
  with open(os.path.join(os.path.abspath(os.path.expanduser(workdir)), SOURCE_FILE), "w") as f:
    json.dump({"source": src, "architecture": arch.ARCHITECTURE, "dtype": source_dtype, "fresh_head": fresh_head},
              f)
  n = sum(x.size for x in jax.tree.leaves(params))
  note = (": a BertModel has no masked-LM head, so a fresh one was made (train the run on task.kind='mlm' before"
          " filling masks; embeddings and fine-tuning read the encoder)") if fresh_head else ""
  return (f"wrote {workdir}: {arch.ARCHITECTURE}, {n:,} parameters ({model_cfg.num_layers} layers, width"
          f" {model_cfg.d_model}), tokenizer {tokenizer.name}, from {directory}{note}")


def _fresh_head(model_cfg) -> dict:
  """A masked-LM prediction head as training initialises it (seed 0), for an encoder
  imported without one."""
  from flax.core import meta

  from tpu_lm.model import transformer

  model = transformer.Transformer(model_cfg)
  tokens = np.zeros((1, 1), np.int32)
  params = meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), tokens, tokens, tokens)["params"])())
  return {k: jax.tree.map(lambda x: np.asarray(x, np.float32), params[k])
          for k in ("head_dense", "head_norm", "output_bias")}


def _check_against_model(params, model_cfg, directory: str) -> None:
  """Every tensor's shape against what the config makes: a mismatch is one line."""
  from tpu_lm.model import params as params_lib
  from tpu_lm.model import transformer

  abstract, _ = params_lib.abstract_params(transformer.Transformer(model_cfg))
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise UserError(f"{directory}: {name} has shape {have.get(name)}, its config.json makes {want.get(name)}:"
                      " the weights and config.json do not belong together.")


def read_export_config(workdir: str, step: int | None = None, to: str = "Hugging Face"):
  """(absolute workdir, step, config) of the run to export (`to` names the format in the
  refusal of a run that is not a language model); nothing heavy is read yet."""
  from tpu_lm.inference import run_dir

  workdir = os.path.abspath(os.path.expanduser(workdir))
  step = run_dir.resolve_step(workdir, step)
  config = run_dir.read_config(workdir, step)
  objective = tasks.from_config(config)
  encoder = objective.name == mlm.NAME and to == "Hugging Face"
  if not objective.generates and not encoder:
    raise UserError(f"{workdir} is a {objective.name} run: only language models (and, to Hugging Face, masked-LM"
                    f" encoders) export to {to}.")
  if run_dir.quantized(config):
    raise UserError(f"{workdir} holds integer kernels (written by python -m tpu_lm.compress): export the run it was"
                    " compressed from.")
  m = config.model
  for field, value, off in (("qk_norm", m.qk_norm, False), ("logit_softcap", m.logit_softcap, 0.0)):
    if value != off:
      layouts = "BERT and RoFormer" if encoder else "Llama and GPT-2"
      raise UserError(f"{workdir} was trained with model.{field}={value!r}, which the {layouts} layouts of"
                      f" {to} cannot express: its exported model would compute something else. Serve it with"
                      " python -m tpu_lm.serve, or train with the option off to export.")
  return workdir, step, config


def read_export_params(workdir: str, step: int, config) -> dict:
  """The run's parameters as float32 NumPy arrays, one subtree per layer (layers_0, ...)."""
  from tpu_lm.inference import run_dir
  from tpu_lm.parallel import mesh as mesh_lib

  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params, model_cfg, _ = run_dir.read_model(workdir, step, config, mesh, dtype="float32")
  if model_cfg.scan_layers:
    from tpu_lm.model import params as params_lib

    params = params_lib.unstack_layers(params)
  return jax.tree.map(np.asarray, jax.device_get(params))


def export_model(workdir: str, dst: str, step: int | None = None, dtype: str = "auto") -> str:
  from tpu_lm.data import tokenizer as tokenizer_lib
  from tpu_lm.interop import tokenizer_export

  workdir, step, config = read_export_config(workdir, step)
  m = config.model
  encoder = tasks.from_config(config).name == mlm.NAME
  if encoder and m.position == "rope":
    arch = bert.ROFORMER
  elif encoder:
    arch = bert.ROBERTA if _source(workdir).get("architecture") == bert.ROBERTA.ARCHITECTURE else bert.BERT
  else:
    arch = gpt2 if m.position == "learned" else llama
  arch.check_exportable(m)
  if dtype == "auto":
    dtype = _source_dtype(workdir)
  if dtype not in _DTYPES:
    raise UserError(f"--dtype={dtype}: use auto, float32, bfloat16 or float16.")
  tokenizer = tokenizer_lib.load_for_run(workdir)
  params = read_export_params(workdir, step, config)
  vocab = derived.tokenizer_vocab_size(config)
  vision = derived.vision_config(config)  # a reading run's image half, written beside the decoder
  if encoder:
    if imported_without_head(workdir):
      raise UserError(f"{workdir} was imported from a BertModel and its masked-LM head never trained: train it on"
                      " task.kind='mlm' (--config.init_from) before exporting it as a masked LM.")
    tensors = arch.from_params(params, m, vocab, tokenizer.pad_id)
  else:
    tensors = arch.from_params(params, m, vocab)
  tensors = {k: np.asarray(v).astype(_DTYPES[dtype]) for k, v in tensors.items()}
  dst = os.path.abspath(os.path.expanduser(dst))
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise UserError(f"{dst} exists and is not empty: pass a new --to_hf directory (nothing was overwritten).")
  # Written beside it, then renamed: a failure leaves no half-written model behind.
  tmp = f"{dst}.tmp{os.getpid()}"
  try:
    os.makedirs(tmp, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {dst} ({e.strerror}): pass a writable --to_hf directory.") from None
  try:
    hf = arch.hf_config(m, vocab, tokenizer, dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                 "pad_token_id": tokenizer.pad_id}, f, indent=2)
    safetensors_io.write(tmp, tensors)
    tokenizer_export.write(tokenizer, tmp, m.max_len, encoder=encoder)
    if vision is not None:
      _write_vision(tmp, params["vision_encoder"], vision, _DTYPES[dtype])
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      import shutil

      shutil.rmtree(tmp)
  done = f"wrote {dst}: {arch.ARCHITECTURE} ({dtype}) from {workdir} step {step}"
  if vision is not None:
    done += (f"; the decoder alone, reading left to right (the run reads a prompt both ways), and the vision"
             f" encoder and projector in {VISION_WEIGHTS} and {VISION_CONFIG} (no transformers class reads them)")
  return done


VISION_WEIGHTS, VISION_CONFIG = "vision_encoder.safetensors", "vision_config.json"


def _write_vision(directory: str, params: dict, vision, dtype) -> None:
  """A reading run's image half beside its exported decoder: the ViT and projector as
  safetensors (tpu_lm's names and [in, out] kernels) and the settings that rebuild it,
  with how a prompt is laid out (num_patches placeholder positions, then BOS)."""
  import dataclasses

  flat = {"/".join(str(k.key) for k in path): np.asarray(x).astype(dtype)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}
  safetensors_io.write_file(os.path.join(directory, VISION_WEIGHTS), flat, {"format": "np"})
  with open(os.path.join(directory, VISION_CONFIG), "w") as f:
    json.dump({**dataclasses.asdict(vision), "num_patches": vision.num_patches,
               "prompt": "num_patches placeholder positions filled by the projected patches, then BOS and the text"},
              f, indent=2)


def _source(workdir: str) -> dict:
  """hf_source.json of an imported run ({} for one trained here)."""
  try:
    with open(os.path.join(workdir, SOURCE_FILE)) as f:
      return dict(json.load(f))
  except (OSError, ValueError, TypeError):
    return {}


def imported_without_head(workdir: str) -> bool:
  """Whether the run is a BertModel's import, whose masked-LM head never trained."""
  return bool(_source(workdir).get("fresh_head"))


def _source_dtype(workdir: str) -> str:
  return _source(workdir).get("dtype", "float32")

