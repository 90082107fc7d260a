"""Interop: python -m tpu_lm.convert --from_hf=DIR_OR_HUB_NAME --workdir=RUN
           python -m tpu_lm.convert --to_hf=DIR --workdir=RUN
           python -m tpu_lm.convert --to_gguf=FILE --workdir=RUN [--gguf_type=f32|f16|q8_0]

--from_hf reads a Hugging Face model directory (config.json, model.safetensors or a
sharded index, tokenizer.json) or, where a network exists, a hub name (gpt2,
meta-llama/Llama-3.2-1B), and writes a run directory that generate, serve and
fine-tuning (--config.init_from=RUN) accept. --to_hf writes the run's newest (or
--step's) parameters and its tokenizer as a directory transformers loads with
AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained (an encoder run:
AutoModelForMaskedLM and the fill-mask pipeline).
GPT2LMHeadModel and LlamaForCausalLM (GQA, any rope_theta, tied or untied, Llama 3
RoPE scaling) are supported, and the encoders BertForMaskedLM, BertForPreTraining,
BertModel and RobertaForMaskedLM (import and export) and RoFormerForMaskedLM (export).
--to_gguf writes a Llama-shape run (and its bytes or SentencePiece tokenizer) as one
GGUF file, which llama.cpp and Ollama load.
"""

from absl import flags

from tpu_lm.errors import UserError

_FROM = flags.DEFINE_string("from_hf", None, "Hugging Face model directory or hub name to import.")
_TO = flags.DEFINE_string("to_hf", None, "Directory to export the run to, in Hugging Face's format.")
_TO_GGUF = flags.DEFINE_string("to_gguf", None, "File to export a Llama-shape run to, in GGUF (llama.cpp, Ollama).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "The run directory: written by --from_hf, read by --to_hf and --to_gguf.")
_STEP = flags.DEFINE_integer("step", None, "With --to_hf or --to_gguf: the checkpoint step to export (default: the"
                             " newest).")
_DTYPE = flags.DEFINE_string(
    "dtype", "auto", "With --to_hf: float32, bfloat16 or float16; auto: what the model was imported in, else"
    " float32. With --from_hf: the run's compute dtype (float32, bfloat16).")
_GGUF_TYPE = flags.DEFINE_string(
    "gguf_type", "f16", "With --to_gguf: f32 (exact), f16 (matrices in float16) or q8_0 (matrices in 8-bit blocks);"
    " norms stay float32.")
flags.mark_flags_as_required(["workdir"])


def body() -> None:
  if sum(bool(f.value) for f in (_FROM, _TO, _TO_GGUF)) != 1:
    raise UserError("pass exactly one of --from_hf=DIR (import), --to_hf=DIR and --to_gguf=FILE (export), with"
                    " --workdir=RUN.")
  if _TO_GGUF.value:
    from tpu_lm.interop import gguf_export

    print(gguf_export.export(_WORKDIR.value, _TO_GGUF.value, _GGUF_TYPE.value, _STEP.value), flush=True)
    return
  from tpu_lm.interop import hf

  if _FROM.value:
    dtype = "float32" if _DTYPE.value == "auto" else _DTYPE.value
    if dtype not in ("float32", "bfloat16", "float16"):
      raise UserError(f"--dtype={dtype}: a run's compute dtype is float32, bfloat16 or float16.")
    print(hf.import_model(_FROM.value, _WORKDIR.value, dtype), flush=True)
  else:
    print(hf.export_model(_WORKDIR.value, _TO.value, _STEP.value, _DTYPE.value), flush=True)
