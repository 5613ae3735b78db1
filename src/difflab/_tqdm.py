"""The ``tqdm`` of difflab's progress bars: notebook widgets where ipywidgets is installed, text
bars everywhere else. (``tqdm.auto`` alone warns "IProgress not found" in a notebook kernel
without ipywidgets, on the first progress bar of every notebook.)"""

from importlib.util import find_spec

if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
