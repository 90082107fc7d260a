"""Compress a run directory into a new one: python -m tpu_lm.compress --workdir=RUN --out=NEW ...

  --quant=int8                 weight-only int8, one scale per output channel
  --quant=int4 --tile_size=32  weight-only int4, a scale per 32 input rows (group-wise)
  --quant=int8 --act_int8      int8 weights and int8 activations at every matmul
  --sparsity=0.5               one-shot magnitude pruning of the blocks' kernels
  --n_m=2:4                    2:4 structured pruning (N of every M input weights)

Pruning and quantization combine (pruned first). The new run directory holds the
integer kernels (int4 two to a byte) and records how it was made in its config;
`generate` and `serve` read it like any run. Both runs are evaluated on the
validation split; the numbers are printed and kept in NEW/compression.json.
Quantization-aware training and gradual pruning are training configs (README
"Compression"); their runs are written quantized here.
"""

from absl import flags

from tpu_lm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to compress.")
_OUT = flags.DEFINE_string("out", None, "The new run directory to write (must not hold checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step to compress (default: the newest).")
_QUANT = flags.DEFINE_string("quant", "", "Weight quantization: int8, int4, or empty for none.")
_TILE = flags.DEFINE_integer("tile_size", 0, "Input rows per scale group (0: one scale per output channel).")
_ACT = flags.DEFINE_bool("act_int8", False, "Quantize activations to int8 at each matmul too.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.0, "One-shot magnitude pruning to this fraction of zeros.")
_NM = flags.DEFINE_string("n_m", "", "N:M structured pruning, e.g. 2:4.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_max_batches", 0, "Evaluate on this many batches (0: the run's setting).")
flags.mark_flags_as_required(["workdir", "out"])


# What the before -> after line reports, the first an objective's eval has: a language
# model's bits per byte, an encoder's bits per masked token, a classifier's or tagger's accuracy.
_HEADLINE = (("eval_bpb", "bits/byte"), ("eval_bits_per_token", "bits per masked token"),
             ("eval_accuracy", "accuracy"), ("eval_loss", "loss"))


def body() -> None:
  from tpu_lm.config import checks, defaults
  from tpu_lm.model import quant
  from tpu_lm.training import compression, prune

  if not (_QUANT.value or _SPARSITY.value or _NM.value):
    raise UserError("nothing to do: give --quant=int8|int4, --sparsity=FRACTION or --n_m=N:M.")
  if _ACT.value and not _QUANT.value:
    raise UserError("--act_int8 quantizes activations with the weights: give --quant=int8 too.")
  probe = defaults.get_config()  # the flags checked as the config fields they become
  probe.quant.update(weight_qtype=_QUANT.value, tile_size=_TILE.value, act_qtype="int8" if _ACT.value else "")
  probe.prune.update(sparsity=_SPARSITY.value, n_m=_NM.value)
  try:
    checks.validate(probe)
  except UserError as e:
    raise UserError(str(e).replace("config field quant.weight_qtype", "--quant").replace(
        "config field quant.", "--").replace("config field prune.", "--")) from None
  result = compression.compress(
      _WORKDIR.value, _OUT.value, quant_spec=quant.Spec.from_config(probe.quant),
      prune_spec=prune.Spec.from_config(probe.prune), step=_STEP.value, eval_max_batches=_EVAL_BATCHES.value)
  key, name = next((k, n) for k, n in _HEADLINE if k in result.source)
  b, a = result.source[key], result.compressed[key]
  print(f"wrote {_OUT.value}: {result.bits_per_weight:.2f} bits per parameter, sparsity"
        f" {result.sparsity['targets']:.1%} of the pruned kernels ({result.sparsity['overall']:.1%} of all"
        f" parameters); {result.bytes_on_disk[0] / 2**20:.2f} MiB of float32 parameters -> a"
        f" {result.bytes_on_disk[1] / 2**20:.2f} MiB checkpoint")
  print(f"validation {name} {b:.4f} -> {a:.4f} ({a - b:+.4f})")
