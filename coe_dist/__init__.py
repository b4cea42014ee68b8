"""coe-dist: distributed expert-parallel training of Chain-of-Experts language models."""

__version__ = "0.1.0"
