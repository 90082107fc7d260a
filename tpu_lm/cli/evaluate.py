"""lm-evaluation-harness tasks on a run: python -m tpu_lm.evaluate (or tpu-lm eval)

  python -m tpu_lm.evaluate --workdir=RUN --tasks=hellaswag,arc_easy [--num_fewshot=0 --limit=100]
  python -m tpu_lm.evaluate --workdir=RUN --tasks=my_task.yaml       # a local task: no download

The run (any run directory: trained here, fine-tuned with LoRA, quantized by
compress, converted from Hugging Face) is the harness's model on this machine's
accelerators (tpu_lm/harness/model.py). Prints the harness's table and writes its
JSON and table under RUN/harness/<time>/ (--output_dir elsewhere).
"""

from absl import flags

from tpu_lm import cli

_WORKDIR = flags.DEFINE_string("workdir", "", "The run directory to evaluate.")
_TASKS = flags.DEFINE_string("tasks", "", "Comma-separated lm-eval task, group or tag names, or task YAML files.")
_INCLUDE = flags.DEFINE_string("include_path", "", "A folder of task YAML files to search as well.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", -1, "Examples in each prompt; -1: each task's own.")
_LIMIT = flags.DEFINE_float("limit", 0, "At most this many documents per task (a fraction below 1: of each task);"
                            " 0: all.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences scored per compiled call.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Sequences generated at once (the decoder's slots).")
_MAX_GEN = flags.DEFINE_integer("max_gen_toks", 256, "Tokens generated per request at most, unless its task says.")
_STEP = flags.DEFINE_integer("step", None, "Evaluate this checkpoint (default: the newest).")
_TP = flags.DEFINE_integer("tensor_parallel", 1, "Split heads/MLP/vocab this many ways (the rest is data-parallel).")
_SAMPLES = flags.DEFINE_bool("log_samples", False, "Also write every request and response (samples_<task>.jsonl).")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Render prompts with the run's chat template (an"
                          " instruction-tuned run).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_iters", 100000, "Bootstrap resamples for the standard errors lm-eval"
                                  " cannot compute in closed form; 0: none.")
_SEED = flags.DEFINE_integer("seed", 0, "Few-shot sampling and generation seed.")
_OUT = flags.DEFINE_string("output_dir", "", "Where results go (default: RUN/harness).")
cli.positive(_BATCH)
cli.positive(_MAX_BATCH)
cli.positive(_MAX_GEN)
cli.positive(_TP)
cli.at_least(_FEWSHOT, -1)
cli.check_flag(_LIMIT, lambda v: v >= 0, "it must be 0 (all), a number of documents, or a fraction below 1")
cli.at_least(_BOOTSTRAP, 0)

USAGE = "python -m tpu_lm.evaluate --workdir=RUN --tasks=NAMES|TASK.yaml [--num_fewshot=N --limit=N]"


def body() -> None:
  import os

  import jax

  from tpu_lm import storage
  from tpu_lm.errors import UserError
  from tpu_lm.harness import benchmarks

  if not _WORKDIR.value:
    raise UserError(f"--workdir is required: {USAGE}.")
  names, manager = benchmarks.resolve(_TASKS.value, _INCLUDE.value)  # before loading the model: a typo costs nothing
  from tpu_lm.harness.model import TpuLM
  from tpu_lm.inference import run_dir

  run = run_dir.load(_WORKDIR.value, step=_STEP.value, tensor_parallel=_TP.value)
  out_root = _OUT.value or os.path.join(run.workdir, "harness")
  if jax.process_index() == 0:
    storage.check_writable(out_root, "--output_dir")  # before minutes of evaluation, not after
  lm = TpuLM(run, batch_size=_BATCH.value, max_batch=_MAX_BATCH.value, max_gen_toks=_MAX_GEN.value, seed=_SEED.value)
  limit = _LIMIT.value if _LIMIT.value < 1 else int(_LIMIT.value)
  results = benchmarks.evaluate(lm, names, manager, num_fewshot=_FEWSHOT.value, limit=limit, log_samples=_SAMPLES.value,
                           bootstrap_iters=_BOOTSTRAP.value, apply_chat_template=_CHAT.value, seed=_SEED.value)
  results["config"]["model"] = "tpu_lm"
  results["config"]["model_args"] = f"workdir={run.workdir},step={run.step}"
  if jax.process_index() != 0:
    return
  print(f"{run.workdir} (step {run.step}), {', '.join(names)}"
        + (f", {_FEWSHOT.value}-shot" if _FEWSHOT.value >= 0 else "") + (f", limit {limit}" if limit else ""))
  print(benchmarks.table(results))
  out = benchmarks.write(results, out_root)
  print(f"results: {out}/results.json")
