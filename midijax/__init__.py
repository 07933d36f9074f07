"""midijax: a JAX/Flax training system for symbolic music (MIDI).

Modules by stage, in the order data flows (each imports only its own stage or earlier
ones; tests/test_imports.py checks it):

* MIDI and tokens: `midi_io` (MIDI <-> `notes.Notes`), `encoding` (notes <-> token ids,
  grammar tables).
* Data and measures: `input_pipeline` (TFDS -> batches), `music_stats` (music features,
  set comparison), `reports` (metrics files, plots), `metric_writers` (metrics.jsonl,
  TensorBoard), `ngram` (the baseline).
* Model: `models`, `sharding`, `kernels`.
* Runtime: `checkpoint`, `losses`, `runs` (loading a trained run), `constraints` (the
  grammars' JAX state machines), `finetune` (init_from, trainable parameters,
  `midijax export`).
* Training and sampling: `train`, `aot` (`midijax compile`), `sampling`, `generation`
  (what `generate` / `continue` write).
* Evidence: `evaluation` (`midijax evaluate`), `export` (listening tests), `experiments`
  (`midijax compare-runs`, `midijax reproduce`).
* `cli`: the `midijax` command.
"""
import warnings

# note-seq imports pydub, which warns at import time when ffmpeg is absent; midijax never
# uses pydub's audio decoding, so the warning is noise.
warnings.filterwarnings("ignore", message="Couldn't find ffmpeg or avconv")

__version__ = "0.1.0"
