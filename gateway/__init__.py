"""Multi-protocol broadcast gateway."""

__version__ = "0.1.0"
