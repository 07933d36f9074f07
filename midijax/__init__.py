"""midijax: a JAX/Flax training system for symbolic music (MIDI).

Stages, in the order data flows: `midi_io` (MIDI <-> `notes.Notes`), `encoding` (notes <->
token ids), `input_pipeline` (TFDS -> batches), `models` and `sharding`, `train`,
`checkpoint`, `sampling`, `evaluation`, `export`; `cli` is the `midijax` command.
"""
import warnings

# note-seq imports pydub, which warns at import time when ffmpeg is absent; midijax never
# uses pydub's audio decoding, so the warning is noise.
warnings.filterwarnings("ignore", message="Couldn't find ffmpeg or avconv")

__version__ = "0.1.0"
