"""The ``tqdm`` of difflab's progress bars: notebook widgets where ipywidgets is installed, text
bars everywhere else.

In a notebook kernel without ipywidgets, the first import of ``tqdm.auto`` warns "IProgress not
found" (and falls back to text bars). difflab imports it here once with that warning silenced, so
that the later imports by Accelerate and others find it loaded and print nothing either."""

import importlib
import warnings
from importlib.util import find_spec

from tqdm.std import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    importlib.import_module("tqdm.auto")

if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
