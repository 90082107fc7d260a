"""Config validation: every user mistake found before any work.

`validate` takes the ConfigDict as the user wrote it and raises `UserError` with
one sentence naming the field and what is allowed.
"""

from tpu_lm import tasks
from tpu_lm.config import defaults
from tpu_lm.errors import UserError
from tpu_lm.model import kernels

def _check_freeze(config) -> None:
  import re

  patterns = config.optim.freeze
  if isinstance(patterns, str):
    fail("optim.freeze", patterns, "it must be a tuple of regular expressions, e.g. ('embed/.*',)")
  for p in [*patterns, config.lora.targets]:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      field = "lora.targets" if p is config.lora.targets else "optim.freeze"
      fail(field, p, f"it is not a regular expression ({e})")
  if patterns and config.model.scan_layers:
    fail("optim.freeze", tuple(patterns), "freezing names per-layer parameters: set model.scan_layers=False")
  if config.lora.rank and config.model.scan_layers:
    fail("lora.rank", config.lora.rank, "LoRA adapters are added per layer: set model.scan_layers=False")


def _check_compression(config) -> None:
  import re

  q, p, d = config.quant, config.prune, config.distill
  if q.weight_qtype not in ("", "int8", "int4"):
    fail("quant.weight_qtype", q.weight_qtype, "use 'int8', 'int4' or '' (none)")
  if q.act_qtype not in ("", "int8"):
    fail("quant.act_qtype", q.act_qtype, "use 'int8' or '' (none)")
  if q.act_qtype and not q.weight_qtype:
    fail("quant.act_qtype", q.act_qtype, "activations are quantized with the weights: set quant.weight_qtype too")
  if q.tile_size < 0 or (q.tile_size and q.tile_size & (q.tile_size - 1)):
    fail("quant.tile_size", q.tile_size, "use 0 (one scale per output channel) or a power of two")
  if q.weight_qtype and (config.lora.rank or config.model.scan_layers):
    fail("quant.weight_qtype", q.weight_qtype, "quantization needs model.scan_layers=False and no LoRA")
  if not 0 <= p.sparsity < 1:
    fail("prune.sparsity", p.sparsity, "it must be in [0, 1)")
  if p.n_m:
    nm = re.fullmatch(r"(\d+):(\d+)", p.n_m)
    if not nm or not 0 < int(nm[1]) < int(nm[2]):
      fail("prune.n_m", p.n_m, "write 'N:M' with 0 < N < M, e.g. '2:4'")
    if p.sparsity:
      fail("prune.sparsity", p.sparsity, "prune.n_m fixes the sparsity: set one of them")
  if not (0 <= p.begin_step <= p.end_step and p.every >= 1):
    fail("prune.end_step", p.end_step, f"need 0 <= begin_step ({p.begin_step}) <= end_step and every >= 1")
  if (p.sparsity or p.n_m) and config.model.scan_layers:
    fail("prune.sparsity", p.sparsity or p.n_m, "pruning names per-layer kernels: set model.scan_layers=False")
  for field, pattern in (("quant.targets", q.targets), ("prune.targets", p.targets)):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      fail(field, pattern, f"it is not a regular expression ({e})")
  if not 0 <= d.alpha <= 1:
    fail("distill.alpha", d.alpha, "it must be in [0, 1]")
  if not d.temperature > 0:
    fail("distill.temperature", d.temperature, "it must be > 0")
  if d.teacher and tasks.name_of(config) != tasks.distill.NAME:
    fail("distill.teacher", d.teacher, "distillation trains a language model: task.kind must be 'lm'")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def fail(field, value, allowed):
  raise UserError(f"config field {field} is {value!r}: {allowed}.")


def validate(config) -> None:
  """Raises UserError on the first bad value; returns None when the config is usable."""
  if config.task.kind not in tasks.names():
    fail("task.kind", config.task.kind, "use one of " + ", ".join(repr(a) for a in tasks.names()))
  defaults.get_config()  # the fields' rules are declared as the fields are made
  for field, allowed in defaults.CHOICES.items():
    value = _get(config, field)
    if value not in allowed:
      fail(field, value, "use one of " + ", ".join(repr(a) for a in allowed))
  for field in sorted(defaults.POSITIVE_INTS):
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      fail(field, value, "it must be a positive integer")
  for field in sorted(defaults.NON_NEGATIVE):
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      fail(field, value, "it must be a number >= 0")

  m = config.model
  heads, kv_heads = m.num_heads, m.num_kv_heads or m.num_heads
  if not m.head_dim and m.d_model % heads:
    fail("model.num_heads", heads, f"it must divide model.d_model ({m.d_model}), or set model.head_dim")
  if heads % kv_heads:
    fail("model.num_kv_heads", kv_heads, f"it must divide model.num_heads ({heads})")
  head_dim = m.head_dim or m.d_model // heads
  if m.position == "rope" and head_dim % 2:
    fail("model.head_dim", head_dim, "rotary positions need an even head dimension")
  if not 0 <= m.dropout_rate < 1:
    fail("model.dropout_rate", m.dropout_rate, "it must be in [0, 1)")
  if config.data.seq_len > m.max_len:
    fail(
        "data.seq_len", config.data.seq_len,
        f"it is longer than the model's positions (model.max_len={m.max_len}); raise model.max_len",
    )
  if config.data.tokenizer == "sentencepiece" and not 260 <= config.data.vocab_size <= 1 << 20:
    fail("data.vocab_size", config.data.vocab_size, "a SentencePiece vocabulary must be between 260 and 1048576")
  if config.data.dataset in ("text_files", "instructions") and not config.data.path:
    kind = "text files" if config.data.dataset == "text_files" else "JSONL files of {\"prompt\", \"completion\"}"
    fail("data.path", "", f"data.dataset={config.data.dataset!r} needs a directory, file or glob of {kind}")
  if config.data.chat_template.count("{prompt}") != 1:
    fail("data.chat_template", config.data.chat_template, "it must hold \"{prompt}\" exactly once, where each"
         " instruction's prompt goes")
  if not config.data.tokenizer_sample_mb > 0:
    fail("data.tokenizer_sample_mb", config.data.tokenizer_sample_mb, "it must be a number of MB > 0")
  if config.data.tokenizer == "hf" and not config.data.tokenizer_path and not config.init_from:
    fail("data.tokenizer_path", "", "data.tokenizer='hf' needs the directory of a Hugging Face tokenizer.json")
  _check_vision(config)
  tasks.from_config(config).check(config)  # the objective's own rules
  if config.data.dataset == tasks.instructions.DATASET and tasks.name_of(config) != tasks.instructions.NAME:
    fail("task.kind", config.task.kind, "data.dataset='instructions' trains the language model: use 'lm'")
  if m.rope_scaling.type != "none":
    s = m.rope_scaling
    if not (s.factor >= 1 and 0 < s.low_freq_factor < s.high_freq_factor and s.original_max_len > 0):
      fail("model.rope_scaling", s.to_dict(), "llama3 scaling needs factor >= 1, 0 < low_freq_factor <"
           " high_freq_factor and original_max_len > 0")
  _check_freeze(config)
  _check_compression(config)
  _check_privacy(config)
  _check_eval_harness(config)
  if not 0 <= config.optim.min_lr_ratio <= 1:
    fail("optim.min_lr_ratio", config.optim.min_lr_ratio, "it must be in [0, 1]")
  if not 0 <= config.optim.decay_fraction <= 1:
    fail("optim.decay_fraction", config.optim.decay_fraction, "the wsd schedule decays over this fraction of"
         " num_train_steps: it must be in [0, 1]")
  objective = tasks.from_config(config)
  if config.optim.z_loss and not hasattr(objective, "z_loss"):
    fail("optim.z_loss", config.optim.z_loss, f"the {tasks.name_of(config)} objective does not add the z-loss to its"
         " loss (lm, instructions, fim and distill do): set it to 0")
  own = objective.attention  # a classifier's and a tagger's is task.attention itself
  if config.task.attention and config.task.attention != own:
    fail("task.attention", config.task.attention, f"only a classifier or a tagger chooses its attention; the"
         f" {tasks.name_of(config)} objective's is {own}: leave it ''")
  if config.optim.optimizer == "schedule_free_adamw":
    if config.optim.schedule != "constant":
      fail("optim.schedule", config.optim.schedule, "schedule-free AdamW replaces the decay by averaging: set"
           " optim.schedule='constant' (its warmup_steps still apply)")
    if not 0 < config.optim.b1 <= 1:
      fail("optim.b1", config.optim.b1, "schedule-free AdamW interpolates with b1: it must be in (0, 1]")
    if config.prune.sparsity or config.prune.n_m:
      fail("optim.optimizer", "schedule_free_adamw", "pruning masks the trained iterate, not schedule-free's"
           " averaged parameters: use another optimizer with prune.*")
  if not 0 <= config.optim.muon_momentum < 1:
    fail("optim.muon_momentum", config.optim.muon_momentum, "it must be in [0, 1)")
  if config.optim.warmup_steps > config.num_train_steps:
    fail("optim.warmup_steps", config.optim.warmup_steps, f"it must not exceed num_train_steps ({config.num_train_steps})")
  for axes in (("data", "fsdp", "tensor"), ("dcn_data", "dcn_fsdp", "dcn_tensor")):
    for axis in axes:
      v = config.mesh[axis]
      if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
        fail(f"mesh.{axis}", v, "it must be a positive integer or -1 (fill with the remaining devices)")
    if [config.mesh[a] for a in axes].count(-1) > 1:
      raise UserError(f"only one of {', '.join('mesh.' + a for a in axes)} may be -1.")
  if config.mesh.preset == "fsdp_tensor" and config.mesh.tensor < 2:
    fail("mesh.tensor", config.mesh.tensor, "mesh.preset='fsdp_tensor' needs the tensor-parallel size here, e.g. 4")
  if config.data.global_batch_size % config.optim.grad_accum_steps:
    fail(
        "optim.grad_accum_steps", config.optim.grad_accum_steps,
        f"it must divide data.global_batch_size ({config.data.global_batch_size})",
    )
  if m.logits_chunk and config.data.seq_len % m.logits_chunk:
    fail("model.logits_chunk", m.logits_chunk, f"it must divide data.seq_len ({config.data.seq_len}), or be 0")
  if m.attention == "splash" and not kernels.splash_fits(config.data.seq_len):
    fail("data.seq_len", config.data.seq_len, "the splash attention kernel needs a multiple of 128 (or at most 128)")
  if config.optim.loss_scale == "dynamic" and m.dtype != "float16":
    fail("optim.loss_scale", "dynamic", "loss scaling is for model.dtype='float16'; use 'auto' or 'none'")
  rules = config.mesh.rules
  if not all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules):
    fail("mesh.rules", rules, "it must be a sequence of (logical name, mesh axes) pairs")
  # The samples after training are decoded within the model's context, learned
  # positions or rotary alike: found now, not after the whole run.
  if config.sample.num_prompts and config.sample.prompt_tokens + config.sample.new_tokens > m.max_len:
    fail(
        "sample.new_tokens", config.sample.new_tokens,
        f"sample.prompt_tokens ({config.sample.prompt_tokens}) plus new tokens must fit model.max_len"
        f" ({m.max_len}); lower them or raise model.max_len",
    )


def _check_vision(config) -> None:
  from tpu_lm.config import derived

  v = config.vision
  reads = getattr(tasks.from_config(config), "reads_images", False)
  if not v.image_height and not v.image_width:
    return
  if not reads:
    fail("vision.image_height", v.image_height, f"the {tasks.name_of(config)} objective reads no images: set it to"
         " 0, or use task.kind='reading'")
  if not v.image_height or not v.image_width:
    fail("vision.image_width" if v.image_height else "vision.image_height", 0,
         "give the images both a height and a width in pixels")
  try:
    derived.vision_config(config).check()
  except ValueError as e:
    fail("vision", f"{v.image_height}x{v.image_width}, patch {v.patch}", f"{e}: change vision.image_height,"
         " image_width, patch, patch_height or num_heads")


def _check_eval_harness(config) -> None:
  h = config.eval_harness
  if not isinstance(h.tasks, str):
    fail("eval_harness.tasks", h.tasks, "write the lm-eval task names (or YAML files) as one comma-separated string")
  if not h.tasks:
    return
  if not tasks.from_config(config).generates:
    fail("eval_harness.tasks", h.tasks, "lm-evaluation-harness tasks score a language model: this run's"
         f" task.kind is {config.task.kind!r}")
  if config.quant.qat:
    fail("eval_harness.tasks", h.tasks, "the harness scores the float weights, not quantization-aware training's"
         " fake-quantized model: compress the finished run (python -m tpu_lm.compress) and evaluate that with"
         " python -m tpu_lm.evaluate")
  if h.every_steps % config.eval_every_steps:
    fail("eval_harness.every_steps", h.every_steps, f"harness tasks run at evals: use a multiple of eval_every_steps"
         f" ({config.eval_every_steps}), or 0 for the final eval only")
  if isinstance(h.num_fewshot, bool) or not isinstance(h.num_fewshot, int) or h.num_fewshot < -1:
    fail("eval_harness.num_fewshot", h.num_fewshot, "use a number of examples >= 0, or -1 for each task's own")


def _check_privacy(config) -> None:
  p = config.privacy
  if not p.dp:
    return
  if not p.clip_norm > 0:
    fail("privacy.clip_norm", p.clip_norm, "DP-SGD clips every example's gradient to this L2 norm: give one > 0")
  if p.target_epsilon < 0 or p.noise_multiplier < 0:
    fail("privacy.target_epsilon", p.target_epsilon, "epsilon and the noise multiplier must be >= 0")
  if p.target_epsilon and p.noise_multiplier:
    fail("privacy.noise_multiplier", p.noise_multiplier, "give either privacy.target_epsilon (the noise is"
         " calibrated to it) or privacy.noise_multiplier, not both")
  if not 0 < p.delta < 1:
    fail("privacy.delta", p.delta, "it must be in (0, 1), and below 1 / (the number of training examples)")
  if p.expected_batch_size > config.data.global_batch_size:
    fail("privacy.expected_batch_size", p.expected_batch_size, "the expected Poisson batch must not exceed"
         f" data.global_batch_size ({config.data.global_batch_size}), the compiled batch it is padded to")
  if config.model.dtype == "float16":
    fail("model.dtype", "float16", "DP-SGD's per-example gradients are not loss-scaled: use bfloat16 or float32")
  if config.distill.teacher or config.prune.sparsity or config.prune.n_m or config.quant.qat:
    fail("privacy.dp", True, "DP-SGD trains language models, classifiers and instruction tuning; combine it"
         " with distillation, pruning or QAT in a second run")
