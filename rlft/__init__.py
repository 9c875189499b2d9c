"""rlft: reward finetuning of text-to-image diffusion models (DDPO, PRDP, PXPO)."""

__version__ = "0.1.0"
