"""How well does a small vision-language model read lines of code from pictures, and what
does it take? configs/reading.py (a ViT of full-height strips before a byte-level
decoder; tasks/reading.py) scored on the held-out lines of the standard library's
validation files (one line of each, drawn the same way every time), by character error
rate and exact-line accuracy, against:

- the seed (0 and 1: how far apart two runs of the same settings land);
- the number of training steps (a quarter, half and all of the config's 4172);
- the image size (16 x 128, 24 x 192 and the config's 32 x 256 pixels, fonts scaled with
  it; always 32 strips, so the same positions and cost);
- whether the decoder was pretrained on text first (configs/base.py's recipe with a
  byte tokenizer, 2086 steps): trained with the image half from the start; frozen for
  half the steps while the vision encoder and projector learn, then unfrozen; or adapted
  by LoRA (rank 8 on the decoder's projections) while the vision half trains in full.

  python experiments/multimodal/run.py [--fresh] [--only=lora,...]

Every run is the real command in a subprocess; finished runs in runs/ are reused (pass
--fresh to rerun). Puts the table on top of results.md next to this file (newest
first); draws held-out samples with their images (reading_samples.png) and where the
config's run looks while reading one of them (attention.png) next to it. `--only` runs
the named runs (and those they start from) and prints their rows, writing nothing.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as a module
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.multimodal.run", *sys.argv[1:]])

import argparse
import concurrent.futures
import os
import threading

from experiments import record

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 4172  # configs/reading.STEPS
FREEZE_DECODER = "(?!vision_encoder/).*"  # every parameter but the image half's


def _steps(n: int) -> dict:
  return {"num_train_steps": n, "optim.warmup_steps": round(0.05 * n), "eval_every_steps": n,
          "checkpoint_every_steps": n}


def _size(height: int) -> dict:
  """An image `height` pixels tall (8 wide per 1 tall, as the config's), fonts and offsets
  scaled from the config's 14-18 px and 4 px at 32, cut into 32 full-height strips."""
  scale = height / 32
  return {"vision.image_height": height, "vision.image_width": 8 * height, "vision.patch_height": height,
          "vision.patch": height // 4, "reading.min_font": round(14 * scale), "reading.max_font": round(18 * scale),
          "reading.max_offset": round(4 * scale)}


TEXT = {"data.tokenizer": "bytes", "sample.num_prompts": 0}  # the pretrained decoder: configs/base.py, bytes


def runs(runs_dir: str) -> dict:
  """name -> (config, overrides, what it is, the run it starts from or None)."""
  text = os.path.join(runs_dir, "text")
  frozen = os.path.join(runs_dir, "frozen")
  return {
      "steps_1043": ("configs/reading.py", _steps(STEPS // 4), "from scratch, a quarter of the steps", None),
      "steps_2086": ("configs/reading.py", _steps(STEPS // 2), "from scratch, half the steps", None),
      "scratch": ("configs/reading.py", {}, "from scratch (`configs/reading.py`)", None),
      "scratch_seed1": ("configs/reading.py", {"seed": 1}, "the same, seed 1", None),
      "size_16": ("configs/reading.py", _size(16), "from scratch, 16 x 128 pixels (fonts 7-9 px)", None),
      "size_24": ("configs/reading.py", _size(24), "from scratch, 24 x 192 pixels (fonts 10-14 px)", None),
      "text": ("configs/base.py", TEXT, "text pretraining (configs/base.py, byte tokenizer)", None),
      "frozen": ("configs/reading.py", {**_steps(STEPS // 2), "init_from": text, "optim.freeze": f"('{FREEZE_DECODER}',)"},
                 "pretrained decoder, frozen: the image half learns alone (half the steps)", "text"),
      "unfrozen": ("configs/reading.py", {**_steps(STEPS // 2), "init_from": frozen},
                   "... then everything, the other half (together: all the steps)", "frozen"),
      "pretrained": ("configs/reading.py", {"init_from": text}, "pretrained decoder, all trained from the start",
                     "text"),
      "lora": ("configs/reading.py", {"init_from": text, "lora.rank": 8, "lora.targets": "layers_.*"},
               "pretrained decoder adapted by LoRA (rank 8), the image half trained in full", "text"),
  }


def samples(workdir: str, path: str, count: int = 8) -> list[tuple[str, str]]:
  """Draws the first `count` held-out lines, each image above its truth and the run's
  reading, into `path`; returns (truth, read) pairs."""
  import jax
  from matplotlib.figure import Figure

  from tpu_lm import tasks
  from tpu_lm.data import sources
  from tpu_lm.inference import run_dir

  run = run_dir.load(workdir, devices=jax.devices()[:1])
  objective = tasks.from_config(run.config)
  validation = sources.open_splits(run.config.data).validation
  records = validation.get(list(range(count)))
  read, truth = objective.transcribe(run.decoder, run.tokenizer, records, run.config.data.seq_len
                                     - objective.image_slots - 1)
  images = [objective.example(r, None)[1][..., 0] for r in records]
  fig = Figure(figsize=(6.4, 1.05 * count), layout="constrained")
  for ax, image, t, r in zip(fig.subplots(count, 1), images, truth, read):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    mark = "exact" if r == t else "read"
    ax.set_title(f"truth: {t}\n{mark}:  {r}", fontsize=7, loc="left", family="monospace")
  fig.savefig(path, dpi=80)
  _palette(path)
  return list(zip(truth, read))


def attention(workdir: str, path: str, index: int = 4) -> None:
  """Where the run looks in held-out line `index` while reading it (inspect --image)."""
  from tpu_lm import tasks
  from tpu_lm.data import sources
  from tpu_lm.inference import run_dir
  from tpu_lm.interpret import image_attention
  from tpu_lm.interpret import run as interpret_run

  m = interpret_run.load(workdir)
  config = run_dir.read_config(workdir, m.step)
  held_out = sources.open_splits(config.data).validation.get([index])[0]
  _, pixels = tasks.from_config(config).example(held_out, None)
  r = image_attention.inspect_image(m, pixels)
  image_attention.png(pixels, r["maps_KxRxC"], r["tokens"], path, dpi=70)
  _palette(path)


def _palette(path: str) -> None:
  """The PNG in 16 colours: the pictures' noise does not compress, so a full-colour copy
  would be ten times the repository's other plots."""
  from PIL import Image

  with Image.open(path) as picture:
    small = picture.convert("RGB").quantize(16)
  small.save(path, optimize=True)


def _code(text: str) -> str:
  """Text as a Markdown table cell in code: backticks and pipes inside kept."""
  return "`` " + text.replace("|", "\\|") + " ``" if text else "(nothing)"


def _row(plan: dict, runs_dir: str, name: str, wall: float) -> str:
  """A run's row of the table."""
  _, overrides, what, _ = plan[name]
  result = record.final_eval(os.path.join(runs_dir, name))
  height = overrides.get("vision.image_height", 32)
  steps = overrides.get("num_train_steps", STEPS)
  return (f"| {what} | {steps} | {height} x {8 * height} | {result['eval_cer']:.3f} | {result['eval_exact']:.3f} |"
          f" {result['eval_token_accuracy']:.3f} | {result['eval_loss']:.3f} | {wall:.0f} |")


def _only(plan: dict, runs_dir: str, names: list[str], fresh: bool, factor: float) -> None:
  """The named runs, each after the runs it starts from, one at a time; their rows printed."""
  unknown = [n for n in names if n not in plan]
  if unknown:
    raise SystemExit(f"--only: no run named {', '.join(unknown)}; the runs are {', '.join(plan)}")
  order: list[str] = []

  def visit(name):
    after = plan[name][3]
    if after:
      visit(after)
    if name not in order:
      order.append(name)

  for name in names:
    visit(name)
  walls = {name: record.train(plan[name][0], os.path.join(runs_dir, name), plan[name][1], fresh and name in names)
           for name in order}
  print(factor)
  for name in names:
    print(_row(plan, runs_dir, name, walls[name]) if name != "text" else
          f"text: {record.final_eval(os.path.join(runs_dir, name))['eval_bpb']:.4f} bits/byte, {walls[name]:.0f} s")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--fresh", action="store_true", help="rerun finished runs too")
  p.add_argument("--only", default="", help="comma-separated runs to measure alone (their rows printed, not written)")
  args = p.parse_args()
  factor = record.speed_factor()
  runs_dir = os.path.join(HERE, "runs")
  plan = runs(runs_dir)
  walls: dict[str, float] = {}
  if args.only:
    _only(plan, runs_dir, args.only.split(","), args.fresh, factor)
    return

  finished = {name: threading.Event() for name in plan}

  def lane(names):
    for name in names:
      config, overrides, _, after = plan[name]
      if after:
        finished[after].wait()  # a run starts from the one before it
        if record.final_eval(os.path.join(runs_dir, after)) is None:
          raise SystemExit(f"{name} starts from {after}, which failed")
      try:
        walls[name] = record.train(config, os.path.join(runs_dir, name), overrides, args.fresh)
      finally:
        finished[name].set()  # (a failure too: what waits on it stops)
      print(f"{name}: {walls[name]:.0f} s {record.final_eval(os.path.join(runs_dir, name))}", flush=True)

  # Two lanes side by side: the pretrained decoder's chain, and the runs from scratch (then LoRA).
  lanes = [["text", "frozen", "unfrozen", "pretrained"],
           ["scratch", "steps_1043", "steps_2086", "size_16", "size_24", "lora", "scratch_seed1"]]
  with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
    list(pool.map(lane, lanes))

  text = record.final_eval(os.path.join(runs_dir, "text"))
  lines = [
      "Held-out lines: one from each of the 96 validation files of the standard library, each drawn the same way"
      " every time (font, offset and noise seeded by the line), read greedily from the image alone. Character"
      " error rate: edits over the reference characters (reading nothing scores 1.0, writing more than the line holds"
      " above it); exact: lines read"
      " without an error. One seed each but where a second is shown. Wall time is each run's whole command, two"
      " runs at a time (the pretrained decoder's chain beside the others), so each is slower than alone: the"
      " README's time is `configs/reading.py` run alone.", "",
      "| run | steps | image | CER | exact lines | next-character accuracy | eval loss (nats/char) | wall s |",
      "|---|---|---|---|---|---|---|---|"]
  lines += [_row(plan, runs_dir, name, walls[name]) for name in plan if name != "text"]
  lines += ["", f"The text pretraining (configs/base.py with data.tokenizer='bytes', 2086 steps of 8 x 256 bytes):"
            f" {text['eval_bpb']:.4f} bits/byte on the validation split, {walls['text']:.0f} s.", ""]
  pairs = samples(os.path.join(runs_dir, "scratch"), os.path.join(HERE, "reading_samples.png"))
  attention(os.path.join(runs_dir, "scratch"), os.path.join(HERE, "attention.png"))
  lines += ["Samples (configs/reading.py's run, the first held-out lines; reading_samples.png next to this file"
            " draws them with their images):", "", "| truth | read |", "|---|---|"]
  lines += [f"| {_code(t)} | {_code(r)} |" for t, r in pairs]
  record.publish(os.path.join(HERE, "results.md"), "Reading lines of code from pictures", lines, factor)


if __name__ == "__main__":
  main()
