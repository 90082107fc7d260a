"""notebooks/quickstart.ipynb runs top to bottom (nbclient, an ipykernel kernel), with its
parameters cell pointed at the test corpus and tiny shapes, so it can never silently rot."""

import os

import nbformat
import pytest

from tests.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_the_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(corpus_dir, data_dir, tmp_path):
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  overrides = {**TINY, "num_train_steps": 12, "eval_every_steps": 6, "checkpoint_every_steps": 6,
               "data.path": corpus_dir, "data.data_dir": data_dir}
  params.source = (f"WORKDIR = {str(tmp_path / 'run')!r}\nOVERRIDES = {overrides!r}\n"
                   "TEXT = 'the model reads a token'\nCORRUPT = 'the model moves a token'\n")
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in nb.cells
             if c.cell_type == "code"]
  text = "\n".join(outputs)
  assert "final validation:" in text and "bits/byte" in text
  assert "'the model reads a token" in text  # the samples
  assert "integrated gradients complete within" in text
  assert os.path.exists(tmp_path / "run" / "inspect" / "inspect.html")
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the loss curve and the attention maps
