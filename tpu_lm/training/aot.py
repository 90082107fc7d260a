"""Will this config fit that TPU slice? Compile the real train step for it, here.

`python -m tpu_lm.main --config=configs/llama_8b.py --compile_for=v5p-64` builds
the config's mesh on the slice's devices (described by libtpu, see topology.py),
lowers and compiles the very train step a run would execute, and reports what
XLA's TPU compiler says it needs: per-chip HBM (arguments + outputs not aliased
to them + temporaries + code) against the chip's HBM, the FLOPs of one step, and
the step time a given MFU implies. Nothing is trained, read or written.
"""

import dataclasses
import re
import time

import jax

from tpu_lm.config import checks
from tpu_lm.model import params as params_lib
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.parallel import topology
from tpu_lm.training import checkpoint as checkpoint_lib
from tpu_lm.training import metrics as metrics_lib
from tpu_lm.training.setup import Setup, check_batch
from tpu_lm.errors import UserError


@dataclasses.dataclass
class Report:
  slice: topology.Slice
  mesh_shape: dict
  num_params: int
  arguments_bytes: int  # per chip: params, optimizer state, batch
  outputs_bytes: int  # per chip, beyond those aliased to (donated) arguments
  temp_bytes: int  # per chip: activations, gradients, collective buffers
  code_bytes: int
  program_flops_per_step: float  # all chips, XLA's cost analysis (see _program_flops)
  model_flops_per_step: float  # 6N + 12·L·d·T per token, whole batch
  compile_s: float
  tokens_per_step: int

  @property
  def hbm_needed(self) -> int:
    return self.arguments_bytes + self.outputs_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.hbm_needed <= self.slice.chip.hbm_bytes

  def step_time_at(self, mfu: float) -> float:
    return self.model_flops_per_step / (self.slice.num_chips * self.slice.chip.peak_bf16_flops * mfu)

  def lines(self, mfu: float) -> list[str]:
    s, gib = self.slice, topology.GIB
    step_s = self.step_time_at(mfu)
    slices = f" x {s.num_slices} slices" if s.num_slices > 1 else ""
    return [
        f"compiled for {s.name}{slices}: {s.num_chips} chips ({s.topology_name}, {s.num_hosts} host(s)),"
        f" mesh {self.mesh_shape}, in {self.compile_s:.0f} s",
        f"  parameters        {self.num_params:,}",
        f"  HBM per chip      {self.hbm_needed / gib:.2f} GiB of {s.chip.hbm_bytes / gib:.0f} GiB"
        f" ({100 * self.hbm_needed / s.chip.hbm_bytes:.0f}%): arguments {self.arguments_bytes / gib:.2f},"
        f" outputs {self.outputs_bytes / gib:.2f}, temporaries {self.temp_bytes / gib:.2f},"
        f" code {self.code_bytes / gib:.2f}",
        f"  FLOPs per step    {self.program_flops_per_step:.3e} by XLA's cost analysis of the step;"
        f" {self.model_flops_per_step:.3e} by 6N + 12·L·d·T per token (MFU's numerator)",
        f"  at {100 * mfu:.0f}% MFU       {_seconds(step_s)}/step, {self.tokens_per_step / step_s:,.0f} tokens/s"
        f" ({s.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak per chip)",
        "  fits" if self.fits else
        f"  DOES NOT FIT: {(self.hbm_needed - s.chip.hbm_bytes) / gib:.2f} GiB per chip over",
    ]


def compile_for(config, slice_name: str, num_slices: int = 1) -> Report:
  """Compiles `config`'s train step for the named slice; raises UserError on config
  mistakes (mesh, batch) exactly as a real run on that slice would."""
  checks.validate(config)
  s = topology.parse(slice_name, num_slices)
  devices = topology.devices(s)
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes(config.mesh), devices)
  setup = Setup(config, mesh)
  check_batch(config, mesh, s.num_hosts)
  d = config.data
  state = checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings)
  batch = _abstract_batch(config, setup)
  t0 = time.time()
  with setup.context():
    lowered = setup.train_step.lower(state, batch)
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA's TPU compiler refuses programs that cannot fit in HBM
      oom = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*?)\.?(?:\n|$)", str(e))
      if not oom:
        raise
      raise UserError(
          f"the train step does not fit {s.name}: the TPU compiler says {oom.group(1).strip()}. Shard more"
          f" (mesh.fsdp), rematerialise (model.remat='full'), accumulate gradients (optim.grad_accum_steps)"
          " or pick a bigger slice."
      ) from e
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  return Report(
      slice=s,
      mesh_shape=dict(mesh.shape),
      num_params=params_lib.num_params(setup.abstract_state.params),
      arguments_bytes=mem.argument_size_in_bytes,
      outputs_bytes=max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0),
      temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      program_flops_per_step=_program_flops(config),
      model_flops_per_step=setup.flops_per_step(),
      compile_s=compile_s,
      tokens_per_step=d.global_batch_size * d.seq_len,
  )


def _program_flops(config) -> float:
  """FLOPs of one global step as XLA's cost analysis counts them in the step's
  HLO (remat recompute included; backend-independent, so taken on the CPU).

  The analysis counts a loop body once, so scanned layers and accumulated
  microbatches (and logits chunks) would be undercounted. Layers are identical, and a
  step's FLOPs are a part linear in the batch (forward and backward) plus a part that
  is not (the optimizer update: AdamW's is negligible, Muon's Newton-Schulz iterations
  are not). So the step is lowered unrolled with one layer and with two, for one row
  and for two, and both parts are extrapolated to the config's layers:
  g(L) = g(1) + (L - 1)(g(2) - g(1)); the per-row part is then taken times the global
  batch. Attention is XLA's here: a Pallas kernel is opaque to the cost analysis.
  """
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  flops = {}
  for layers in (1, 2):
    for rows in (1, 2):
      c = config.copy_and_resolve_references()
      c.model.num_layers, c.model.scan_layers, c.model.attention = layers, False, "xla"
      c.model.logits_chunk = 0  # a loop too (same FLOPs but for the recomputed logits)
      c.optim.grad_accum_steps, c.data.global_batch_size = 1, rows
      c.mesh.update(preset="", data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
      setup = Setup(c, mesh)
      state = checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings)
      with setup.context():
        cost = setup.train_step.lower(state, _abstract_batch(c, setup)).cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops[layers, rows] = float((cost or {}).get("flops", 0.0))
  per_row = {n: flops[n, 2] - flops[n, 1] for n in (1, 2)}
  fixed = {n: flops[n, 1] - per_row[n] for n in (1, 2)}
  layers = config.model.num_layers

  def extrapolate(g):
    return g[1] + (layers - 1) * (g[2] - g[1])

  return extrapolate(fixed) + extrapolate(per_row) * config.data.global_batch_size


def _abstract_batch(config, setup) -> dict:
  """The objective's rows (its layout's fields: a loss mask, a label, images), a global batch of them."""
  d = config.data
  return {k: jax.ShapeDtypeStruct((d.global_batch_size, *shape), dtype, sharding=setup.batch_sharding)
          for k, (shape, dtype) in setup.task.layout.row_fields(d.seq_len).items()}


def run(config, slice_name: str, num_slices: int, mfu: float) -> Report:
  """The CLI's --compile_for: print the report; UserError (exit 2) when it does not fit."""
  if not 0 < mfu <= 1:
    raise UserError(f"--mfu={mfu}: give the model FLOPs utilisation to assume as a fraction in (0, 1], e.g. 0.4.")
  metrics_lib.console(f"compiling the train step for {slice_name} (no TPU needed; nothing is trained)...")
  report = compile_for(config, slice_name, num_slices)
  for line in report.lines(mfu):
    metrics_lib.console(line)
  if not report.fits:
    raise UserError(
        f"the train step needs {report.hbm_needed / topology.GIB:.2f} GiB per chip but a {report.slice.name}"
        f" chip has {report.slice.chip.hbm_bytes / topology.GIB:.0f} GiB: shard more (mesh.fsdp), rematerialise"
        " (model.remat='full'), accumulate gradients (optim.grad_accum_steps) or pick a bigger slice."
    )
  return report


def _seconds(s: float) -> str:
  return f"{s:.2f} s" if s >= 1 else f"{1e3 * s:.1f} ms"
