"""Encoder or decoder, at this scale? Both pretrained on the same tokens, then fine-tuned
on the same classification task.

Pretrains configs/base.py (the decoder: next-token prediction, causal attention) and
configs/encoder.py (BERT's layout with rotary positions at the same width and depth,
and the same data, recipe and steps, as a masked LM: attention both ways, the loss on
15% of the tokens), then fine-tunes each for the offline
classification task of the transfer experiment (stdlib_functions: which of ten
standard-library packages a function comes from, held out by file) with
configs/finetune.py, --steps steps: the decoder from its last token's state, the
encoder from its first (CLS) token's, as each was trained to read; and for token
tagging (each token of the standard library's source labelled with its Python class,
tasks/tagging.py). Reports each pretraining's own eval and wall time, and the
fine-tuned models' accuracy and macro F1, for --seeds fine-tuning seeds.

  python experiments/encoder/run.py [--steps 300] [--seeds 0 1] [--jobs 2]

Every run is the real command in a subprocess; finished pretraining runs in runs/ are
reused. Puts the table on top of results.md next to this file (newest first).
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as a module
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.encoder.run", *sys.argv[1:]])

import argparse
import concurrent.futures
import json
import os
import statistics

from experiments import record

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED = {"decoder": "configs/base.py", "encoder": "configs/encoder.py"}


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of batch 8")
  p.add_argument("--seeds", nargs="*", type=int, default=[0, 1], help="fine-tuning seeds")
  p.add_argument("--jobs", type=int, default=2, help="runs at once")
  p.add_argument("--reuse", action="store_true", help="reuse finished fine-tuning runs too (to rewrite the table)")
  args = p.parse_args()
  factor = record.speed_factor()
  runs = os.path.join(HERE, "runs")
  pretrained = {kind: os.path.join(runs, kind) for kind in PRETRAINED}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    list(pool.map(lambda kind: record.train(PRETRAINED[kind], pretrained[kind], {"sample.num_prompts": 0},
                                            fresh=False), PRETRAINED))
  print({kind: record.final_eval(pretrained[kind]) for kind in PRETRAINED}, flush=True)
  jobs = [(kind, seed) for kind in PRETRAINED for seed in args.seeds]

  tasks = {"cls": {"task.kind": "classification", "data.dataset": "stdlib_functions", "data.path": ""},
           "tag": {"task.kind": "tagging"}}  # tagging: the base's corpus, its tokens' Python classes

  def finetune(job):
    kind, task, seed = job
    workdir = os.path.join(runs, f"{kind}_{task}_s{seed}")
    wall = record.train(f"configs/finetune.py:{pretrained[kind]}", workdir, {
        **tasks[task], "seed": seed, "num_train_steps": args.steps, "eval_every_steps": args.steps,
        "checkpoint_every_steps": args.steps, "log_every_steps": 50}, fresh=not args.reuse)
    return job, wall, record.final_eval(workdir)

  jobs = [(kind, task, seed) for task in tasks for kind, seed in jobs]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    tuned = {job: (wall, result) for job, wall, result in pool.map(finetune, jobs)}
  dec, enc = record.final_eval(pretrained["decoder"]), record.final_eval(pretrained["encoder"])
  lines = [
      "Pretraining, 2 layers x 160 each (the decoder Llama-shaped, 1.2M parameters; the encoder RoFormer-shaped, 1.0M:"
      " BERT's post-norm blocks, GELU and tied head, rotary positions), the same data, Muon/WSD recipe and 2086 steps"
      " of 8 x 256 tokens:",
      "",
      "| model | objective | its own eval (whole validation split) | ms per step (median; the two ran side by"
      " side) |", "|---|---|---|---|",
      f"| decoder (`configs/base.py`) | next token, causal | {dec['eval_bpb']:.4f} bits/byte, loss"
      f" {dec['eval_loss']:.4f} nats/token | {_step_ms(pretrained['decoder'])} |",
      f"| encoder (`configs/encoder.py`) | masked tokens (15%), both ways | masked-token accuracy"
      f" {enc['eval_accuracy']:.4f}, {enc['eval_bits_per_token']:.4f} bits per masked token"
      f" | {_step_ms(pretrained['encoder'])} |", "",
      f"Fine-tuned for stdlib_functions (10 packages; validation: other files), {args.steps} steps of batch 8"
      " (configs/finetune.py):", "",
      "| pretrained | reads the function from | " + " | ".join(f"seed {s} accuracy / macro F1" for s in args.seeds)
      + " | mean accuracy | mean macro F1 |",
      "|---|---|" + "---|" * len(args.seeds) + "---|---|"]
  for kind, pooled in (("decoder", "its last token (EOS), causal"), ("encoder", "its first token (CLS), both ways")):
    lines.append(_row(kind, pooled, [tuned[kind, "cls", s][1] for s in args.seeds]))
  lines += ["", f"Fine-tuned to tag each token of the standard library's source with its Python class (name,"
            f" keyword, operator, number, string, comment, space; tasks/tagging.py), {args.steps} steps of 8 x 256"
            " tokens, scored on every token of the validation split:", "",
            "| pretrained | a token sees | " + " | ".join(f"seed {s} accuracy / macro F1" for s in args.seeds)
            + " | mean accuracy | mean macro F1 |", "|---|---|" + "---|" * len(args.seeds) + "---|---|"]
  for kind, sees in (("decoder", "what precedes it"), ("encoder", "its whole row, both ways")):
    lines.append(_row(kind, sees, [tuned[kind, "tag", s][1] for s in args.seeds]))
  record.publish(os.path.join(HERE, "results.md"), "Encoder or decoder: pretrained alike, fine-tuned alike",
                 lines, factor)


def _row(kind: str, how: str, results: list[dict]) -> str:
  return (f"| {kind} | {how} | " + " | ".join(f"{r['eval_accuracy']:.4f} / {r['eval_macro_f1']:.4f}" for r in results)
          + f" | {sum(r['eval_accuracy'] for r in results) / len(results):.4f}"
          f" | {sum(r['eval_macro_f1'] for r in results) / len(results):.4f} |")


def _step_ms(workdir: str) -> str:
  times = [r["step_time_s"] for r in _records(workdir) if "step_time_s" in r]
  return f"{1e3 * statistics.median(times):.0f}"


if __name__ == "__main__":
  main()
