"""inversa: dataset augmentation by diffusion inversion and text-driven editing."""

__version__ = "0.1.0"
