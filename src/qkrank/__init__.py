"""qkrank: how QK-Norm and its learned gain γ shape the dimensional structure of attention keys."""

__version__ = "0.1.0"
