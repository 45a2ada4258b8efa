"""labeldiff: label-efficient semantic segmentation from diffusion pretraining."""
__version__ = "0.1.0"
