"""difflab's progress bars: notebook widgets only where ipywidgets can draw them."""

import importlib
import importlib.util
import warnings

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
