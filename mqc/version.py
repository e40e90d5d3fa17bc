"""The version of mqc (a leaf module: everything that records it imports only this)."""

__version__ = "0.1.0"
