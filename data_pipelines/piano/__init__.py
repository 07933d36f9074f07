"""The piano performances builder (`piano`); importing this registers it with TFDS."""
from .piano import Piano

__all__ = ["Piano"]
