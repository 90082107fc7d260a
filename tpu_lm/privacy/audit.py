"""A memorization audit with canaries (Carlini et al. 2019, "The Secret Sharer").

Secret-like strings of a known format (`password = "<8 hex digits>"`) are inserted
into the training data, each repeated a known number of times. After training, a
canary's exposure measures how much more likely the model finds it than random
strings of the same format:

  exposure = log2 |R| - log2 rank(canary among R),

R the space of secrets (16^8 here, 32 bits), ranked by the log-perplexity the model
gives the whole canary text. Two estimates, as in the paper:
- by sampling: the rank among `num_candidates` random secrets, exposure
  log2(m + 1) - log2(rank); it cannot exceed log2(m + 1);
- by extrapolation (the paper's section 4.3): a skew-normal fitted to the
  candidates' log-perplexities, exposure = -log2 P(candidate <= canary); it reaches
  past log2(m + 1) for canaries far in the tail.
An exposure near 0-1 bit means the model has not singled the canary out; the
maximum (32 bits here) means it would be the model's first guess.

A low exposure says "not memorized" only of canaries the model trained on. So both
ends check the training data with the data pipeline's own functions (local_files'
listing and train/validation split, then data.max_documents): insertion puts every
copy where a text_files run on the given data.path trains on it, or refuses and leaves
the files as they were; the audit refuses a run whose saved config did not train on
each canary the listed number of times.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re

import numpy as np

from tpu_lm.data import local_files
from tpu_lm.errors import UserError

ALPHABET = "0123456789abcdef"
LENGTH = 8
TEMPLATE = 'password = "{}"\n'


@dataclasses.dataclass(frozen=True)
class Canary:
  secret: str
  repeats: int

  @property
  def text(self) -> str:
    return TEMPLATE.format(self.secret)


def make_canaries(repeats: list[int], seed: int = 0) -> list[Canary]:
  rng = np.random.default_rng(seed)
  return [Canary("".join(rng.choice(list(ALPHABET), LENGTH)), int(r)) for r in repeats]


def default_list_path(directory: str) -> str:
  """Where the canaries' list goes: beside the data directory, never in it (a model
  trained on the list would see every secret)."""
  return os.path.abspath(directory).rstrip(os.sep) + "_canaries.json"


def suffix_for(data_path: str) -> str:
  """The file suffix a glob's last part asks for ('*.txt' -> .txt), else .py."""
  m = re.fullmatch(r".*\*(\.\w+)", os.path.basename(data_path))
  return m.group(1) if m else ".py"


def training_documents(data_path: str, max_documents: int = 0) -> tuple[pathlib.Path, list[str], list[str]]:
  """(root, every file, the training documents) of a text_files run on `data_path`, by
  the data pipeline's own rules: local_files' listing and split, then the first
  `max_documents` (data.max_documents)."""
  root, rel = local_files.user_files(data_path)
  train = local_files.split_files(rel)["train"]
  return root, rel, train[:max_documents] if max_documents > 0 else train


def copies(root: pathlib.Path, relpaths: list[str], texts: list[str]) -> dict[str, int]:
  """How many of the files are exactly each text (only files of a text's size are read)."""
  sizes = {len(t.encode("utf-8")) for t in texts}
  out = dict.fromkeys(texts, 0)
  for r in relpaths:
    if (root / r).stat().st_size in sizes and (text := local_files.read_text(root / r)) in out:
      out[text] += 1
  return out


def _names(secret: str, suffix: str):
  i = 0
  while True:  # hashed names scatter the copies among the other files
    yield f"canary_{hashlib.sha256(f'{secret}/{i}'.encode()).hexdigest()[:16]}{suffix}"
    i += 1


def insert(canaries: list[Canary], directory: str, list_path: str = "", data_path: str = "", suffix: str = "",
           max_documents: int = 0) -> str:
  """Writes each canary `repeats` times as its own file into `directory`, where a
  text_files run with data.path=`data_path` (default: the directory) and
  data.max_documents=`max_documents` trains on every copy, and the list to
  `list_path` (default: beside the directory). Returns the list's path. Refuses, and
  leaves the files as they were, where the run would not read each copy in its
  training split, or would read the list."""
  data_path = data_path or directory
  suffix = suffix or suffix_for(data_path)
  path = os.path.abspath(list_path or default_list_path(directory))
  if os.path.commonpath([path, os.path.abspath(directory)]) == os.path.abspath(directory):
    raise UserError(f"--canaries={path} is inside the data directory {directory}: the model would train on the"
                    " secrets' list; put it elsewhere.")
  try:
    root, others, _ = training_documents(data_path)
  except UserError as e:
    raise UserError(f"--data_path={data_path} cannot take canaries yet ({str(e).rstrip('.')}): insert them into"
                    " the corpus the run will train on, once its files are there.") from None
  try:
    where = pathlib.Path(directory).resolve().relative_to(root)
  except ValueError:
    raise UserError(f"--data_path={data_path} reads files under {root}, not {directory}: insert the canaries"
                    " where the run's data.path reads, or pass the data.path it will use.") from None
  names = _choose_names(canaries, directory, suffix, where, others)
  written, previous_list = [], open(path, "rb").read() if os.path.exists(path) else None
  made = not os.path.isdir(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    for c, name in names:
      written.append(os.path.join(directory, name))
      with open(written[-1], "w") as f:
        f.write(c.text)
    with open(path, "w") as f:
      json.dump({"template": TEMPLATE, "alphabet": ALPHABET, "length": LENGTH,
                 "canaries": [dataclasses.asdict(c) for c in canaries]}, f, indent=1)
    _check_inserted(canaries, written, path, data_path, max_documents)
  except BaseException:
    for w in written:
      if os.path.exists(w):
        os.remove(w)
    if previous_list is not None:
      open(path, "wb").write(previous_list)
    elif os.path.exists(path):
      os.remove(path)
    if made:
      os.rmdir(directory)
    raise
  return path


def _choose_names(canaries, directory, suffix, where: pathlib.Path, others: list[str]) -> list[tuple]:
  """[(canary, file name)] for every copy: new names whose paths from the data root
  (what the split hashes) land in the training split, by local_files.split_files."""
  gens = {c.secret: _names(c.secret, suffix) for c in canaries}
  chosen = {}
  while True:
    for c in canaries:
      for k in range(c.repeats):
        if (c, k) not in chosen:
          chosen[c, k] = next(n for n in gens[c.secret] if not os.path.exists(os.path.join(directory, n)))
    relpaths = {key: (where / name).as_posix() for key, name in chosen.items()}
    held_out = set(local_files.split_files(others + list(relpaths.values()))["validation"])
    moved = [key for key, r in relpaths.items() if r in held_out]
    if not moved:
      return [(c, name) for (c, _), name in chosen.items()]
    for key in moved:  # held out, by its hash or as the split's one forced validation file: the next name
      del chosen[key]


def _check_inserted(canaries, written: list[str], list_path: str, data_path: str, max_documents: int) -> None:
  """Refuses unless the data pipeline's functions find every copy among the training
  documents, and the list nowhere in the data."""
  root, rel, train = training_documents(data_path, max_documents)
  listed, kept = {root / r for r in rel}, {root / r for r in train}
  if pathlib.Path(list_path).resolve() in listed:
    raise UserError(f"--data_path={data_path} would read the canaries' list {list_path}: put it elsewhere with"
                    " --canaries.")
  for w in written:
    if pathlib.Path(w).resolve() not in listed:
      raise UserError(f"--data_path={data_path} does not read {w}: pass the data.path the run will use, one that"
                      f" reads files named canary_<hash>{os.path.splitext(w)[1]} (--suffix sets the suffix).")
    if pathlib.Path(w).resolve() not in kept:
      raise UserError(f"{w} is not among the training documents of --data_path={data_path} with"
                      f" --max_documents={max_documents}: raise data.max_documents, or leave it at 0.")
  found = copies(root, train, [c.text for c in canaries])
  for c in canaries:
    if found[c.text] != c.repeats:
      raise UserError(f"the training files of --data_path={data_path} would hold canary {c.secret}"
                      f" {found[c.text]} times, not {c.repeats} (copies inserted before?): use another --seed.")


def check_trained_on(config, canaries: list[Canary], workdir: str) -> None:
  """Refuses (one UserError) unless the run `config` describes trained on every canary
  the listed number of times, by the data pipeline's own functions on its data.path."""
  d = config.data
  if d.dataset != "text_files":
    raise UserError(f"{workdir} trained on data.dataset={d.dataset!r}, not text_files: the canaries were never in"
                    " its training data; audit a run trained on the directory they were inserted into.")
  try:
    root, _, train = training_documents(d.path, d.max_documents)
  except UserError as e:
    raise UserError(f"the training files of {workdir} cannot be checked for the canaries ({str(e).rstrip('.')}):"
                    " audit it where its data.path is readable.") from None
  found = copies(root, train, [c.text for c in canaries])
  for c in canaries:
    if found[c.text] != c.repeats:
      raise UserError(f"canary {c.secret} appears in {found[c.text]} of the training files of {workdir} (data.path"
                      f" {d.path}; expected {c.repeats}): the run did not train on these canaries as listed, so its"
                      " exposure would mean nothing; audit the run trained on the data they were inserted into.")


def read_canaries(path: str) -> list[Canary]:
  try:
    saved = json.load(open(path))
    return [Canary(c["secret"], int(c["repeats"])) for c in saved["canaries"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"--canaries={path} is not a canaries list written by --insert_into ({e}): write one first.") \
        from None


def log_perplexities(m, texts: list[str], batch: int = 256) -> np.ndarray:
  """Nats the model gives each whole text (as the run encodes a prompt, every token
  after the first predicted): through the one scoring function (inference/score.py),
  `batch` texts a call (one compilation for every canary's batches)."""
  from tpu_lm.inference import score

  seqs = [m.encode(t) for t in texts]
  out = []
  for start in range(0, len(seqs), batch):
    scored = score.token_logprobs(m.model, m.params, seqs[start:start + batch], vocab_size=m.tokenizer.vocab_size,
                                  max_len=m.model.cfg.max_len, pad_id=m.tokenizer.pad_id)
    out += [-float(s.logprobs.sum()) for s in scored]
  return np.asarray(out)


def exposure(m, canary: Canary, num_candidates: int = 2000, seed: int = 1) -> dict:
  from scipy import stats

  rng = np.random.default_rng(seed)
  candidates = set()
  while len(candidates) < num_candidates:
    s = "".join(rng.choice(list(ALPHABET), LENGTH))
    if s != canary.secret:
      candidates.add(s)
  scores = log_perplexities(m, [canary.text] + [TEMPLATE.format(s) for s in sorted(candidates)])
  own, others = scores[0], scores[1:]
  rank = 1 + int((others <= own).sum())
  a, loc, scale = stats.skewnorm.fit(others)
  tail = float(stats.skewnorm.cdf(own, a, loc, scale))
  space_bits = LENGTH * math.log2(len(ALPHABET))
  return {"secret": canary.secret, "repeats": canary.repeats, "log_perplexity": float(own),
          "candidates_mean": float(others.mean()), "rank": rank, "candidates": num_candidates,
          "exposure_sampled": math.log2(num_candidates + 1) - math.log2(rank),
          "exposure_extrapolated": min(space_bits, -math.log2(max(tail, 2.0 ** -space_bits)))}
