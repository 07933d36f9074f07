"""The MIDI folder builder (`midi_folder`); importing this registers it with TFDS."""
from .midi_folder import MidiFolder

__all__ = ["MidiFolder"]
