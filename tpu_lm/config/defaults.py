"""Every config field, with its default, what it does and what values it may take: the
schema of a run, each field's one home.

`configs/base.py` (the default experiment) is these defaults; every other config
file derives from it and changes a few fields. A run directory's saved config is
read back over these defaults (`complete`), so a field added later has its
default in older runs.
"""

import ml_collections

from tpu_lm.model import kernels, layers, transformer

# What each field may be, declared beside it below (checks.validate enforces these;
# cross-field rules live there): a choice of values, a positive integer, a number >= 0.
CHOICES: dict[str, tuple] = {}
POSITIVE_INTS: set[str] = set()
NON_NEGATIVE: set[str] = set()


def _choice(field: str, values) -> None:
  CHOICES[field] = tuple(values)


def _positive_int(field: str) -> None:
  POSITIVE_INTS.add(field)


def _non_negative(field: str) -> None:
  NON_NEGATIVE.add(field)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Start from the parameters of a run directory (one trained here, or converted from
  # Hugging Face by python -m tpu_lm.convert): a fresh optimizer at step 0. Its
  # architecture must be this config's; see configs/finetune.py.
  c.init_from = ""
  c.num_train_steps = 2400
  _positive_int('num_train_steps')
  c.log_every_steps = 200
  _positive_int('log_every_steps')
  c.eval_every_steps = 1200
  _positive_int('eval_every_steps')
  c.eval_max_batches = 0  # > 0: each eval reads this many batches of documents in a fixed seeded order; 0: the whole split
  _non_negative('eval_max_batches')
  c.checkpoint_every_steps = 800
  _positive_int('checkpoint_every_steps')
  c.keep_checkpoints = 3
  _positive_int('keep_checkpoints')
  # A step with a NaN/Inf loss or gradient is skipped (no update); this many in a
  # row stop the run with an error, keeping the last good checkpoint.
  c.max_consecutive_nonfinite = 20
  _positive_int('max_consecutive_nonfinite')

  # What the run optimizes, by name (tpu_lm/tasks/, one module each): "lm" (next-token
  # prediction), "instructions" (next-token prediction on prompt/completion records, the
  # loss on completions; also what "lm" with data.dataset="instructions" means),
  # "classification" (a head on the pooled final hidden state; the labels and class
  # count come from the dataset's data.label_key feature), "distill" (a student
  # learning a teacher run's distributions; also "lm" with distill.teacher set), "fim"
  # (fill in the middle), "mlm" (an encoder: masked-token prediction, attention both
  # ways; configs/encoder.py), or "tagging" (a label per token: what each token of
  # Python source is, by Python's tokenize module).
  c.task = ml_collections.ConfigDict()
  c.task.kind = "lm"
  # classification: "last" (the final token's state), "first" (BOS's: an encoder's CLS) or "mean"
  c.task.pooling = "last"
  _choice('task.pooling', ('last', 'first', 'mean'))
  # classification and tagging: "" (causal, a decoder's) or "bidirectional" (an encoder's:
  # a run of task.kind="mlm", fine-tuned with init_from, reads both ways as it was trained to).
  c.task.attention = ""
  _choice('task.attention', ('', 'causal', 'bidirectional'))

  c.data = ml_collections.ConfigDict()
  # "python_stdlib" (offline, the default), "text_files" (+ data.path), "instructions"
  # (JSONL of {"prompt", "completion"} at data.path: the loss covers completions only),
  # "stdlib_functions" (offline classification: a function's top-level package), or a
  # TFDS catalog name ("tiny_shakespeare", "lm1b", "glue/sst2", "imdb_reviews", ...).
  c.data.dataset = "python_stdlib"
  c.data.path = ""  # text_files / instructions: a directory, file or glob
  # instructions: each prompt is written into this at "{prompt}" before its completion;
  # the server's /v1/chat/completions renders a conversation the same way. E.g.
  # "### Question:\n{prompt}\n### Answer:\n". Saved with the run.
  c.data.chat_template = "{prompt}"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.text_key = "text"
  c.data.label_key = "label"  # classification: the integer class feature
  c.data.max_documents = 0  # use only the first this many documents of each split (0: all)
  _non_negative('data.max_documents')
  # "sentencepiece" (trained on the training split once and cached, or the .model file
  # at data.tokenizer_path), "bytes", or "hf" (the Hugging Face tokenizer.json in the
  # directory data.tokenizer_path). With init_from, the source run's own tokenizer is
  # used, whatever this says.
  c.data.tokenizer = "sentencepiece"
  _choice('data.tokenizer', ('sentencepiece', 'bytes', 'hf'))
  c.data.tokenizer_path = ""
  # SentencePiece is trained on this many MB of the training split (memory and time of
  # training grow with it: 32 MB needs ~1.2 GB and ~10 s on 2 cores), in a fixed shuffled
  # order: the same vocabulary on every host, whatever the corpus size.
  c.data.tokenizer_sample_mb = 32.0
  # sentencepiece: its vocabulary; hf: the model's embedding rows (at least the
  # tokenizer's); bytes has 259.
  c.data.vocab_size = 2048
  # Special tokens past the vocabulary that the tokenizer keeps beyond the objective's own:
  # a run fine-tuned from one whose objective added some (the masked LM's <mask>, FIM's
  # sentinels) keeps them, so its vocabulary is its source's (configs/finetune.py copies them).
  c.data.sentinels = ()
  c.data.seq_len = 256
  _positive_int('data.seq_len')
  c.data.global_batch_size = 8
  _positive_int('data.global_batch_size')
  # Training rows are packed from blocks of this many documents (of each row's stream)
  # and emitted in a seeded random order per block: consecutive batches do not walk one
  # long file row by row. Larger: better mixing, a few more documents held per row.
  c.data.shuffle_block_docs = 128
  _positive_int('data.shuffle_block_docs')

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 2
  _positive_int('model.num_layers')
  c.model.d_model = 160
  _positive_int('model.d_model')
  c.model.head_dim = 0  # 0: d_model // num_heads
  _non_negative('model.head_dim')
  c.model.max_len = 256  # positions the model handles (learned: the table size; rope: the context)
  _positive_int('model.max_len')
  c.model.rope_theta = 10_000.0
  # Llama 3's long-context RoPE rescaling (type "llama3"; imported Llama 3 models set it).
  c.model.rope_scaling = ml_collections.ConfigDict(
      {"type": "none", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 8192})
  _choice("model.rope_scaling.type", ("none", "llama3"))
  c.model.norm_eps = 0.0  # 0: the family's own (LayerNorm 1e-5, RMSNorm 1e-6)
  _non_negative('model.norm_eps')
  llama_block(c.model)  # gpt2_block(c.model) for the GPT-2 family (configs/gpt2_small.py)
  # The family fields (llama_block, gpt2_block):
  _choice("model.norm", tuple(layers.DEFAULT_EPS))
  _choice("model.position", ("learned", "rope"))
  _choice("model.mlp", ("gelu", "gelu_exact", "swiglu", "relu2"))  # gelu: the tanh form; gelu_exact: erf (BERT)
  for name in ("model.num_heads", "model.mlp_dim"):
    _positive_int(name)
  _non_negative("model.num_kv_heads")
  c.model.dropout_rate = 0.0
  _non_negative('model.dropout_rate')
  c.model.dtype = "float32"  # compute dtype: "float32", "bfloat16", "float16"; params are always float32
  _choice('model.dtype', ('float32', 'bfloat16', 'float16'))
  # Rematerialisation: "none", "full" (recompute each block), "dots", "dots_no_batch"
  # (save matmul outputs), "qkv_attn" (save the attention projections and output).
  c.model.remat = "none"
  _choice('model.remat', ("none", *transformer.REMAT_POLICIES))
  c.model.scan_layers = False  # one compiled block applied num_layers times
  # > 0: make the [batch, seq, vocab] logits this many positions at a time in the
  # loss (recomputed in the backward pass): for large vocabularies. 0: all at once.
  c.model.logits_chunk = 0
  # "auto": cuDNN flash attention on GPU, Pallas splash on TPU, XLA elsewhere.
  c.model.attention = "auto"
  _choice('model.attention', kernels.IMPLEMENTATIONS)
  c.model.init_std = 0.02
  # The speedrun's model choices (docs/training.md "Recipe"). QK-norm and the soft-cap, like
  # model.mlp="relu2", have no Llama or GPT-2 equivalent: such runs do not export to
  # Hugging Face or GGUF. zero_init_out changes only the initialisation.
  c.model.qk_norm = False  # RMSNorm of each head's queries and keys (a learned [head_dim] scale each)
  c.model.logit_softcap = 0.0  # > 0: logits = cap * tanh(logits / cap), in training and decoding
  _non_negative('model.logit_softcap')
  c.model.zero_init_out = False  # attention-out and MLP-down kernels start at zero
  # BERT's layout (bert_block; Hugging Face BertForMaskedLM / RobertaForMaskedLM): "post"
  # norms each block's residual sum and the embeddings, with no final norm; head_transform
  # adds BERT's prediction head (dense, activation, LayerNorm, a bias on the logits).
  c.model.norm_position = "pre"
  _choice("model.norm_position", ("pre", "post"))
  c.model.head_transform = False

  # A vision encoder (model/vision.py: a ViT and a projector into model.d_model) whose
  # patch embeddings lead each row, before BOS: a model that reads images (task.kind
  # "reading"; configs/reading.py). image_height 0: none. Images are cut into patches
  # `patch` pixels wide and `patch_height` (default `patch`) tall, each a position of
  # data.seq_len before BOS.
  c.vision = ml_collections.ConfigDict()
  c.vision.image_height = 0
  _non_negative('vision.image_height')
  c.vision.image_width = 0
  _non_negative('vision.image_width')
  c.vision.channels = 1  # 1: grayscale, 3: RGB
  _choice('vision.channels', (1, 3))
  c.vision.patch = 8
  _positive_int('vision.patch')
  c.vision.patch_height = 0  # 0: square patches; else this tall (the image's height: strips, for lines of text)
  _non_negative('vision.patch_height')
  c.vision.num_layers = 2
  _non_negative('vision.num_layers')
  c.vision.d_model = 128
  _positive_int('vision.d_model')
  c.vision.num_heads = 4
  _positive_int('vision.num_heads')
  c.vision.mlp_dim = 512
  _positive_int('vision.mlp_dim')
  c.vision.projector = "linear"  # or LLaVA-1.5's "mlp" (two layers, GELU)
  _choice('vision.projector', ('linear', 'mlp'))

  c.optim = ml_collections.ConfigDict()
  # "adamw", "sgd", "adafactor", or "muon": Muon for the blocks' weight matrices (at
  # muon_learning_rate) with AdamW for embeddings, head, norms and biases (at learning_rate);
  # or "schedule_free_adamw" (with schedule "constant": warmup, then no decay; evals, samples,
  # exports and serving use its averaged parameters).
  c.optim.optimizer = "adamw"
  _choice('optim.optimizer', ('adamw', 'sgd', 'adafactor', 'muon', 'schedule_free_adamw'))
  c.optim.learning_rate = 6e-3
  _non_negative('optim.learning_rate')
  c.optim.muon_learning_rate = 0.02  # muon: the hidden matrices' peak rate
  _non_negative('optim.muon_learning_rate')
  c.optim.muon_momentum = 0.95  # muon: Nesterov momentum of the orthogonalized update
  _non_negative('optim.muon_momentum')
  c.optim.muon_ns_steps = 5  # muon: Newton-Schulz iterations per update
  _positive_int('optim.muon_ns_steps')
  # "cosine", "linear", "rsqrt", "constant", or "wsd" (warmup-stable-decay: the peak held,
  # then a linear decay over the last decay_fraction of the steps; a run resumed into a
  # longer budget before its decay continues as if it had been set from the start).
  c.optim.schedule = "cosine"
  _choice('optim.schedule', ('cosine', 'linear', 'rsqrt', 'constant', 'wsd'))
  c.optim.decay_fraction = 0.2  # wsd only
  _non_negative('optim.decay_fraction')
  c.optim.warmup_steps = 120
  _non_negative('optim.warmup_steps')
  c.optim.min_lr_ratio = 0.1  # the cosine/linear/wsd schedules end at this fraction of the peak
  _non_negative('optim.min_lr_ratio')
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9  # sgd only
  c.optim.weight_decay = 0.1  # decoupled; never applied to norms and biases
  _non_negative('optim.weight_decay')
  c.optim.grad_clip_norm = 1.0  # 0: no clipping
  _non_negative('optim.grad_clip_norm')
  c.optim.l1_penalty = 0.0
  _non_negative('optim.l1_penalty')
  # PaLM's z-loss: z_loss * log(Z)^2 per target added to the training loss (1e-4 in PaLM),
  # so the logits' normaliser stays near 1. The logged training loss includes it; evals do not.
  c.optim.z_loss = 0.0
  _non_negative('optim.z_loss')
  # Regular expressions over parameter paths ("embed/embedding", "layers_0/attn/query/kernel",
  # ...): a parameter whose path one of them matches in full is frozen (no update, no
  # optimizer state); the run's log counts both kinds. ("embed/.*", "layers_0/.*")
  # freezes the embedding and the first block. Not with model.scan_layers.
  c.optim.freeze = ()
  # Split each global batch into this many microbatches, summing their gradients
  # (lax.scan): the same update with 1/k of the activation memory.
  c.optim.grad_accum_steps = 1
  _positive_int('optim.grad_accum_steps')
  # float16 compute needs loss scaling; "auto" turns it on exactly then. The scale
  # doubles after loss_scale_period finite steps, halves on overflow (step skipped).
  c.optim.loss_scale = "auto"  # "auto", "dynamic", "none"
  _choice('optim.loss_scale', ('auto', 'dynamic', 'none'))
  c.optim.loss_scale_init = 2.0**15
  c.optim.loss_scale_period = 2000
  _positive_int('optim.loss_scale_period')

  # Device mesh: -1 takes the devices the other axes leave. The default is pure
  # data parallelism; fsdp / tensor shard the parameters instead of replicating.
  c.mesh = ml_collections.ConfigDict()
  # A named layout instead of the three sizes: "data_parallel", "fsdp", or
  # "fsdp_tensor" (tensor-parallel over mesh.tensor devices, FSDP over the rest).
  c.mesh.preset = ""
  _choice('mesh.preset', ('', 'data_parallel', 'fsdp', 'fsdp_tensor'))
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Across slices (TPU multi-slice) or hosts (GPU nodes), over the slower network:
  # each axis is (its ICI size) x (its DCN size) long; -1 fills the slices.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  # Logical axis name -> mesh axes. Parameters and activations are annotated with
  # the names on the left where they are created.
  c.mesh.rules = (
      ("act_batch", ("data", "fsdp")),
      ("act_length", None),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_kv", None),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("pos", None),
      ("norm", None),
      ("classes", None),
      ("vision", None),  # model/vision.py: the image side's flattened patches and the projector's input
      ("layers", None),
  )

  # LoRA (through Qwix): rank > 0 adds low-rank adapters A [in, r] and B [r, out] to
  # every projection whose module path matches `targets`, and trains only those (and a
  # classification head); the output is x W + (alpha / rank) x A B. generate, serve and
  # export read the adapters merged into W.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  _non_negative('lora.rank')
  c.lora.alpha = 16.0
  _non_negative('lora.alpha')
  c.lora.targets = ".*"  # e.g. ".*attn/(query|value)"

  # Compression (README "Compression"; python -m tpu_lm.compress for post-training).
  # Quantization through Qwix: the projections' kernels in int8 or int4 (per output
  # channel, or per group of tile_size input rows), optionally int8 activations. A run
  # directory whose config sets weight_qtype holds the integer kernels; generate and
  # serve run them. qat=True trains with fake quantization (straight-through
  # gradients): quantization-aware fine-tuning, exported quantized at the end.
  c.quant = ml_collections.ConfigDict()
  c.quant.weight_qtype = ""  # "", "int8" or "int4"
  c.quant.tile_size = 0  # 0: one scale per output channel
  c.quant.act_qtype = ""  # "" or "int8"
  # Module paths quantized: the blocks' projections and an untied unembedding (a tied
  # one is the embedding table, kept in float: Qwix would see its attend() as a matmul).
  c.quant.targets = r"layers_\d+/.*|unembed"
  c.quant.qat = False
  # Magnitude pruning of the blocks' projection kernels, the masks kept in the optimizer
  # state (pruned weights stay zero through updates and checkpoints): to `sparsity`
  # (unstructured) or `n_m` ("2:4": N of every M consecutive input weights), at
  # begin_step, or gradually (Zhu & Gupta's cubic schedule) until end_step, the masks
  # recomputed every `every` updates.
  c.prune = ml_collections.ConfigDict()
  c.prune.sparsity = 0.0
  c.prune.n_m = ""
  c.prune.begin_step = 0
  c.prune.end_step = 0
  c.prune.every = 100
  c.prune.targets = r"layers_\d+/.*/kernel"
  # Knowledge distillation: a frozen teacher (a run directory with the same tokenizer)
  # runs in the same step; loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""
  c.distill.alpha = 0.5
  c.distill.temperature = 2.0

  # Fill in the middle (task.kind="fim", tasks/fim.py; Bavarian et al. 2022): each training
  # document, with probability `rate`, is cut at two random characters into prefix,
  # middle and suffix and written with the tokenizer's sentinels, in suffix-prefix-middle
  # order with probability `spm_rate`, else prefix-suffix-middle. Eval is left to right.
  c.fim = ml_collections.ConfigDict()
  c.fim.rate = 0.5
  c.fim.spm_rate = 0.5
  # The unit cut and rearranged: 0, a whole document; else pieces of it, divided at line
  # ends, of at most this many characters, each on its own (a document far longer than
  # a row needs this: prefix, suffix and middle then share a row; tasks/fim.py).
  c.fim.max_chars = 0

  # The masked LM (task.kind="mlm", tasks/mlm.py; BERT, RoBERTa's dynamic masking): each
  # training token is chosen with probability `rate` (anew each epoch, the same on a
  # resume); a chosen token is read as <mask> 80% of the time, a random token 10%, itself
  # 10%, and only chosen tokens are scored. whole_word: choose whole words.
  c.mlm = ml_collections.ConfigDict()
  c.mlm.rate = 0.15
  c.mlm.whole_word = False

  # Reading (task.kind="reading", tasks/reading.py): each example an image, then its text,
  # the loss on the text. source "render": a line of each document drawn on the fly
  # (data/render.py) at a font size from min_font to max_font pixels, its corner moved
  # up to max_offset pixels, Gaussian noise of `noise` x full scale; lines shorter than
  # min_chars are skipped. source "images": a TFDS image-text dataset's image_key image,
  # its text data.text_key, or its class label written into caption_template
  # ("a photo of a {label}"). eval_examples: held-out examples read greedily at each eval
  # (character error rate, exact lines).
  c.reading = ml_collections.ConfigDict()
  c.reading.source = "render"
  c.reading.min_font = 14
  c.reading.max_font = 18
  c.reading.max_offset = 4
  _non_negative('reading.max_offset')
  c.reading.noise = 0.1
  _non_negative('reading.noise')
  c.reading.min_chars = 8
  _positive_int('reading.min_chars')
  c.reading.image_key = "image"
  c.reading.caption_template = ""
  c.reading.eval_examples = 64
  _non_negative('reading.eval_examples')
  # Mixed batches: this share of training examples is a window of the document's text
  # alone (no image; every token scored, as a language model), so the decoder keeps
  # reading text. 0: every example an image.
  c.reading.text_share = 0.0

  # Differentially private training (DP-SGD through jax-privacy; tpu_lm/privacy):
  # each example (one packed row of data.seq_len tokens) joins a step with probability
  # expected_batch_size / N (Poisson), its gradient is clipped to clip_norm, Gaussian
  # noise of noise_multiplier x clip_norm is added to the sum. data.global_batch_size
  # is the compiled batch (rows beyond a step's sample are padding; a larger sample is
  # truncated to it). Epsilon at delta is logged as training goes.
  c.privacy = ml_collections.ConfigDict()
  c.privacy.dp = False
  c.privacy.clip_norm = 1.0
  c.privacy.noise_multiplier = 0.0  # used as given when target_epsilon is 0
  c.privacy.target_epsilon = 0.0  # > 0: the noise is calibrated to reach this at num_train_steps
  c.privacy.delta = 1e-5  # must be below 1 / N
  c.privacy.expected_batch_size = 0  # 0: the largest that overflows data.global_batch_size at most 1e-6 a step

  # lm-evaluation-harness tasks at eval time (pip install 'tpu_lm[eval]'): each task's
  # metrics go to metrics.jsonl and TensorBoard as harness/<task>/<metric>, beside
  # eval_bpb, and a sweep can optimise them (--metric=harness/<task>/acc).
  c.eval_harness = ml_collections.ConfigDict()
  c.eval_harness.tasks = ""  # comma-separated lm-eval task names or YAML files; empty: none
  c.eval_harness.include_path = ""  # a folder of task YAML files (local tasks, no download)
  c.eval_harness.every_steps = 0  # a multiple of eval_every_steps: the evals that run them; 0: the final eval only
  _non_negative('eval_harness.every_steps')
  c.eval_harness.limit = 0  # > 0: at most this many documents per task (a cheap, fixed sample)
  _non_negative('eval_harness.limit')
  c.eval_harness.num_fewshot = -1  # -1: each task's own
  c.eval_harness.batch_size = 16  # sequences scored per compiled call
  _positive_int('eval_harness.batch_size')
  c.eval_harness.max_gen_toks = 64  # cap on tokens generated per generate_until request
  _positive_int('eval_harness.max_gen_toks')

  c.sample = ml_collections.ConfigDict()
  c.sample.num_prompts = 3
  _non_negative('sample.num_prompts')
  c.sample.prompt_tokens = 32
  c.sample.new_tokens = 48
  _non_negative('sample.new_tokens')
  c.sample.temperature = 0.7
  _non_negative('sample.temperature')
  c.sample.top_k = 40
  _non_negative('sample.top_k')

  c.peak_flops_per_device = 0.0  # 0: look up the accelerator; used for MFU only
  _non_negative('peak_flops_per_device')
  return c


def complete(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by a run (as JSON), over today's defaults: fields added since that
  run take their defaults; every saved value is kept as it was."""
  config = get_config()

  def merge(node, values, prefix=""):
    for key, value in values.items():
      if isinstance(value, dict) and key in node and isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        with node.unlocked():
          node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value

  merge(config, saved)
  return config


def llama_block(m: ml_collections.ConfigDict) -> None:
  """Llama family: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied."""
  m.norm = "rmsnorm"
  m.position = "rope"
  m.mlp = "swiglu"
  m.use_bias = False
  m.num_heads = 4
  m.num_kv_heads = 2  # 0: same as num_heads (multi-head); fewer: grouped-query
  m.mlp_dim = 416  # ~2/3 of 4 x width: SwiGLU's three matrices cost what GELU's two do
  m.tie_embeddings = False


def speedrun(c: ml_collections.ConfigDict) -> None:
  """The speedrun's techniques that beat AdamW + cosine at the same wall-clock on the base
  config (experiments/recipe/results.md; configs/base.py uses them): Muon for the blocks'
  matrices, zero-initialised output projections, warmup-stable-decay. None changes the
  architecture, so such a run exports to Hugging Face and GGUF like any Llama-block run."""
  c.optim.optimizer = "muon"
  c.optim.schedule = "wsd"
  c.model.zero_init_out = True


def bert_block(m: ml_collections.ConfigDict) -> None:
  """BERT family (an encoder's; Devlin et al. 2019): learned positions, LayerNorm after
  each sublayer and the embeddings, exact GELU, biases, tied embeddings under BERT's
  prediction head. Exports to Hugging Face as BertForMaskedLM."""
  gpt2_block(m)
  m.mlp = "gelu_exact"
  m.norm_position = "post"
  m.head_transform = True
  m.norm_eps = 1e-12


def gpt2_block(m: ml_collections.ConfigDict) -> None:
  """GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings."""
  m.norm = "layernorm"
  m.position = "learned"
  m.mlp = "gelu"
  m.use_bias = True
  m.num_heads = 2
  m.num_kv_heads = 0
  m.mlp_dim = 4 * m.d_model
  m.tie_embeddings = True
