"""Metric writers: metrics.jsonl, TensorBoard event files and the loss plot.

TensorBoard events are written with the `tensorboard` package's record writer and protos
(`SummaryWriter`), so TensorFlow is never imported. `MetricWriter` is what training logs
through: one JSON line per logged step in WORKDIR/metrics.jsonl plus TensorBoard scalars;
`plot_losses` draws loss.png from metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from typing import Dict, Mapping, Optional, Union

from absl import logging

PathLike = Union[str, os.PathLike]


class SummaryWriter:
  """Writes TensorBoard event files with tensorboard's own record writer and protos.

  tensorboard's `EventFileWriter` opens files through `tf.io.gfile`, which imports all of
  tensorflow (seconds of start-up); this writer opens a local file and uses only
  `RecordWriter` (framing and CRCs) and the summary protos, so tensorflow never loads.
  """

  def __init__(self, logdir: PathLike, filename_suffix: str = ""):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2 = event_pb2
    os.makedirs(logdir, exist_ok=True)
    self.path = pathlib.Path(logdir) / (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        f".{os.getpid()}.{id(self)}{filename_suffix}")
    self._writer = RecordWriter(open(self.path, "wb"))
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._writer.write(event.SerializeToString())

  def _summary(self, step: int, value) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=[value])))

  def scalar(self, tag: str, value: float, step: int) -> None:
    """One scalar (the "scalars" plugin's rank-0 float tensor form)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
    from tensorboard.plugins.scalar import metadata
    meta = metadata.create_summary_metadata(display_name="", description="")
    meta.data_class = summary_pb2.DATA_CLASS_SCALAR
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)])
    tensor.tensor_shape.SetInParent()
    self._summary(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta))

  def text(self, tag: str, markdown: str, step: int) -> None:
    """One Markdown text (the "text" plugin; TensorBoard renders tables)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
    from tensorboard.plugins.text import metadata
    meta = metadata.create_summary_metadata(display_name="", description="")
    meta.data_class = summary_pb2.DATA_CLASS_TENSOR
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[markdown.encode("utf-8")])
    tensor.tensor_shape.SetInParent()
    self._summary(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    if not self._writer.closed:
      self._writer.close()

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_tensorboard_scalars(logdir: PathLike, scalars: Mapping[str, float], step: int,
                              *, text: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  """Writes `scalars` (tag -> value) and optional Markdown `text` at `step`; returns the file."""
  with SummaryWriter(logdir) as w:
    for tag, value in scalars.items():
      w.scalar(tag, value, step)
    for tag, md in (text or {}).items():
      w.text(tag, md, step)
  return w.path


def read_tensorboard_events(path: PathLike) -> list:
  """Parses an event file written by `SummaryWriter` into Event protos (for tests/tools)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = pathlib.Path(path).read_bytes()
  events, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return events


class MetricWriter:
  """metrics.jsonl and TensorBoard scalars of a run (no TensorFlow).

  Args:
    workdir: the run folder (an epath; local or gs://).
    active: whether this process writes (training passes True on process 0 only).
    resume_step: the step a resumed run restarts from: rows of later steps (logged by the
      interrupted run after its last checkpoint, and about to be logged again) are
      dropped, so metrics.jsonl keeps one row per step and kind after any restarts.
  """

  def __init__(self, workdir, active: bool = True, resume_step: Optional[int] = None):
    self.active = active
    self._jsonl = None
    self._tb = None
    self._remote = "://" in str(workdir)
    self._path = workdir / "metrics.jsonl"
    self._rows: list = []
    if self.active:
      if resume_step is not None and self._path.exists():
        self._drop_rows_after(int(resume_step))
      if self._remote:
        # Object stores cannot append: metrics.jsonl is rewritten whole; TensorBoard events go
        # to a local folder (sync it to the bucket, or point TensorBoard at it).
        self._rows = self._path.read_text().splitlines(True) if self._path.exists() else []
        local_tb = pathlib.Path("/tmp/midijax_tensorboard") / workdir.name
        logging.info("TensorBoard events for %s are written to %s", workdir, local_tb)
        self._tb = SummaryWriter(local_tb)
      else:
        self._jsonl = open(self._path, "a")
        self._tb = SummaryWriter(workdir / "tensorboard")

  def _drop_rows_after(self, step: int) -> None:
    """Rewrites metrics.jsonl without the rows of steps after `step` (temp file + rename)."""
    lines = self._path.read_text().splitlines(True)
    keep = []
    for line in lines:
      try:
        row_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        continue  # a torn last line of a killed run
      if row_step <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
      return
    tmp = self._path.parent / (self._path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(self._path)

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    """Appends one row {"step": step, **scalars} and the scalars' TensorBoard events."""
    if not self.active:
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
    if self._remote:
      self._rows.append(line)
      self._path.write_text("".join(self._rows))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def plot_losses(workdir) -> Optional[pathlib.Path]:
  """Writes WORKDIR/loss.png (training and validation NLL per step) from metrics.jsonl.

  Returns the path, or None when metrics.jsonl has no losses.
  """
  from midijax.reports import agg_figure  # pylint: disable=g-import-not-at-top  # matplotlib
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  if not train and not evals:
    return None
  fig = agg_figure(7, 4)
  ax = fig.subplots()
  if train:
    ax.plot(*zip(*train), label="train", lw=1)
  if evals:
    ax.plot(*zip(*evals), "o-", label="validation", lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("NLL per token (nats)")
  ax.set_title(workdir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out = workdir / "loss.png"
  with out.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return out
