"""``difflab serve``: a local web playground for trained models (Gradio, the ``[app]`` extra).

:mod:`~difflab.app.checkpoints` finds and loads the models in the folders given on the command
line, :mod:`~difflab.app.callbacks` computes every picture as a plain function (tested without
a browser), and :mod:`~difflab.app.ui` lays out the page; only the last imports gradio.
"""

from difflab.app.checkpoints import DEMO_DIR, Playground, load_playground

__all__ = ["DEMO_DIR", "Playground", "load_playground"]
