"""difflab's progress bars: notebook widgets only where ipywidgets can draw them."""

import importlib
import importlib.util
import warnings

import pytest
import tqdm.auto
import tqdm.std

import difflab._tqdm


def _reload_with_ipywidgets(monkeypatch, present: bool):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "ipywidgets":
            return real("tqdm") if present else None  # any spec stands for "installed"
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return importlib.reload(difflab._tqdm)


def test_text_bars_without_ipywidgets(monkeypatch):
    try:
        mod = _reload_with_ipywidgets(monkeypatch, present=False)
        assert mod.tqdm is tqdm.std.tqdm
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tqdm.auto's "IProgress not found" would raise here
            for _ in mod.tqdm(range(3), disable=False):
                pass
        mod = _reload_with_ipywidgets(monkeypatch, present=True)
        assert mod.tqdm is tqdm.auto.tqdm
    finally:
        monkeypatch.undo()
        importlib.reload(difflab._tqdm)


def test_a_notebook_kernel_without_ipywidgets_prints_no_warning():
    """Importing the training loop and then Accelerate (which imports tqdm.auto) in a notebook
    kernel: the first output line is the cell's own, no "IProgress not found" on stderr."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    if importlib.util.find_spec("ipywidgets") is not None:
        pytest.skip("ipywidgets is installed: tqdm.auto draws widgets and does not warn")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import difflab.training.loop\nimport accelerate.utils\nimport tqdm.auto\nprint('ok')"))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert [(o.get("name"), o.get("text")) for o in outputs] == [("stdout", "ok\n")], outputs
