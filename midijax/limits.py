"""Limits on what one input file may hold, in one place (no imports: the CLI reads them for
its help without loading numpy).

They are generous for real music and keep any one command's, or build worker's, time and
memory bounded whatever a file contains: readers (`midi_io.read_notes`), encoders
(`Encoding.encode`) and token files (`encoding.token_files`) check them before allocating
anything in proportion to the music's length. A file over a limit is refused with one line
naming the limit (a build skips it and lists the reason in build_report.json).
"""

# Seconds of music: the end of the last note (2 hours).
MAX_SECONDS = 7200.0
# Tokens per file (and notes per file, as every note kept makes at least one token). The
# densest piano performance in the test corpus makes 83 performance tokens a second, 0.6 M
# in 2 hours.
MAX_TOKENS = 2_000_000
# Notes `tokens2midi` writes at most: the MIDI writer (note-seq, pretty_midi, mido) holds
# about 1.5 kB of Python objects per note. A dense 2-hour piano performance has 0.2 M notes.
MAX_WRITE_NOTES = 500_000
# The largest tick a written MIDI event may fall on: MIDI's delta times have 28 bits, so a
# file whose every event lies within it can always be written (and symusic, which keeps
# ticks in int32, reads it back).
MAX_TICK = 2**28 - 1

# Files larger than this are refused (bytes); the symusic reader's default.
MAX_BYTES = 64 * 1024 * 1024
# The note_seq reader holds every event as a Python object (mido, then pretty_midi and the
# NoteSequence: about 150 bytes of memory and 10 us per byte of file), so its default is
# lower. The largest file of the test corpus is 0.16 MB.
NOTE_SEQ_MAX_BYTES = 4 * 1024 * 1024
# pretty_midi allocates 24 bytes per tick up to the file's last tick; this is its own limit,
# which note-seq raises to 1e10 (240 GB). 10 M ticks is 2.9 hours at 480 ticks per quarter
# and 120 quarters a minute.
NOTE_SEQ_MAX_TICK = 10_000_000
# Instrument tracks (MIDI track x channel x program) a file may hold; each costs the parser
# about 2 kB and the reader a fraction of a millisecond. Counted from the bytes before parsing.
MAX_TRACKS = 4096
# Control changes a file may hold (a pedalled piano performance has up to 5 per note).
MAX_CONTROL_CHANGES = 8_000_000
# Longest line of a token file (bytes); a token is a few dozen.
MAX_LINE_BYTES = 256
