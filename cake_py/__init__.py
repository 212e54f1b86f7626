"""cake_py: a distributed inference cluster for transformer models."""

__version__ = "0.1.0"
