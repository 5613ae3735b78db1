"""Small, self-contained experiments that make a point of the course measurable."""

from difflab.experiments.pca_linear_ae import (
                                               PCAvsLinearAEResult,
                                               format_table,
                                               plot_bases,
                                               run_pca_vs_linear_ae,
                                               write_pca_report,
)

__all__ = ["PCAvsLinearAEResult", "format_table", "plot_bases", "run_pca_vs_linear_ae",
           "write_pca_report"]
