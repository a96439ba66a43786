"""Djinn: one GPU process serving many agent sessions over shared model weights."""

__version__ = "0.1.0"
