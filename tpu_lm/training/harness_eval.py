"""lm-evaluation-harness tasks at eval time (config.eval_harness): the parameters being
trained, as they are at that step, are the harness's model; each task's metrics join
the eval's (harness/<task>/<metric>: metrics.jsonl, TensorBoard, a sweep's objective)
and the harness's own results go to RUN/harness/step_<N>/.

The tasks are found (and lm-eval's presence checked) before the first step, so a typo
in a task name costs nothing.
"""

import dataclasses
import os
import time

import jax

from tpu_lm.training import metrics as metrics_lib


@dataclasses.dataclass
class Harness:
  names: list
  manager: object  # lm_eval.tasks.TaskManager
  every_steps: int

  @classmethod
  def prepare(cls, config):
    """The run's harness tasks, resolved; None when it has none."""
    h = config.eval_harness
    if not h.tasks:
      return None
    from tpu_lm.harness import benchmarks

    names, manager = benchmarks.resolve(h.tasks, h.include_path)
    return cls(names, manager, h.every_steps)

  def due(self, step: int, final: bool) -> bool:
    return final or bool(self.every_steps and step % self.every_steps == 0)

  def run(self, setup, params, tokenizer, workdir: str, step: int) -> dict:
    """The tasks' metrics for `params` at `step` (a flat dict of floats)."""
    from tpu_lm.harness import benchmarks
    from tpu_lm.harness.model import TpuLM
    from tpu_lm.inference import run_dir
    from tpu_lm.training import evaluate

    config, h = setup.config, setup.config.eval_harness
    t0 = time.time()
    decoder = evaluate.decoder_for(setup, params, tokenizer)  # LoRA's adapters merged, as a saved run is read
    run = run_dir.Run(workdir, step, config, tokenizer, decoder, setup.task)
    lm = TpuLM(run, batch_size=h.batch_size, max_gen_toks=h.max_gen_toks, seed=config.seed)
    # bootstrap_iters=0: no resampled standard errors inside training (they cost minutes on big tasks).
    results = benchmarks.evaluate(lm, self.names, self.manager, num_fewshot=h.num_fewshot, limit=h.limit,
                             bootstrap_iters=0, seed=config.seed)
    found = benchmarks.metrics(results)
    if jax.process_index() == 0:
      benchmarks.write(results, os.path.join(workdir, "harness", f"step_{step}"))
    shown = "  ".join(f"{k.removeprefix(benchmarks.PREFIX)} {v:.4f}" for k, v in found.items())
    metrics_lib.console(f"harness at step {step}: {shown} in {time.time() - t0:.1f} s")
    return found
