"""The Groove MIDI Dataset builder (`groove`); importing this registers it with TFDS."""
from .groove import Groove

__all__ = ["Groove"]
