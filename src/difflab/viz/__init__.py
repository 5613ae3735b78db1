"""Pictures: image grids, plots and HTML reports."""

from difflab.viz.grid import make_grid, save_grid, save_image, to_uint8
from difflab.viz.plots import plot_latent_scatter, plot_loss_curves
from difflab.viz.report import Report

__all__ = ["Report", "make_grid", "plot_latent_scatter", "plot_loss_curves", "save_grid",
           "save_image", "to_uint8"]
