"""difflab: VAEs and diffusion models, from scratch."""

__version__ = "0.1.0"
