"""Evaluation reports: metrics.json, metrics.md and PNG plots of music statistics.

Plots draw on a matplotlib Figure with an Agg canvas (no pyplot state, no GUI backend).
The statistics themselves are `midijax.music_stats`; TensorBoard files are
`midijax.metric_writers`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np

from midijax import music_stats as stats
from midijax.music_stats import FEATURES_BY_NAME, SetComparison
from midijax.notes import Notes

PathLike = Union[str, os.PathLike]

def metrics_dict(comparison: Optional[SetComparison] = None, *,
                 validity: Optional[Mapping] = None,
                 extra: Optional[Mapping] = None,
                 c2st: Optional[Mapping[str, Mapping]] = None) -> dict:
  """The JSON document `write_reports` writes as metrics.json (`c2st`: {continuation
  length: `midijax.two_sample.c2st` result} under "c2st")."""
  out = {}
  if comparison is not None:
    out["music_statistics"] = comparison.to_dict()
  if validity is not None:
    out["grammar_validity"] = stats.jsonable(dict(validity))
  if c2st:
    out["c2st"] = stats.jsonable({str(k): dict(v) for k, v in c2st.items()})
  if extra:
    out.update(stats.jsonable(dict(extra)))
  return out


def _fmt(v, digits=3) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x, 2) for x in v) + "]"
  if isinstance(v, float):
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
  return str(v)


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def c2st_markdown(c2st: Mapping[str, Mapping]) -> str:
  """metrics.md sections of the continuation C2STs: {length: result} -> one table each,
  with the prompts, the sampling validity and the seconds of music compared."""
  from midijax import two_sample  # pylint: disable=g-import-not-at-top  # scikit-learn
  parts = []
  for n, r in c2st.items():
    text = two_sample.c2st_markdown(
        r, title=f"Classifier two-sample test: {n}-token continuations")
    if "prompt_tokens" in r:
      v = r.get("constrained_validity") or {}
      note = (f"Prompts of {r['prompt_tokens']} event tokens ({r['n_windows']} windows of "
              f"{r['n_pieces']} pieces, folds grouped by piece); real continuations "
              f"{_fmt(r['real_seconds_mean'])} s, generated {_fmt(r['generated_seconds_mean'])} "
              f"s on average; {r['feature_kind']} features. Constrained samples that decode "
              f"to valid MIDI: {v.get('valid', 'n/a')} of {v.get('total', 'n/a')}.")
      head, _, rest = text.partition("\n\n")
      text = f"{head}\n\n{note}\n\n{rest}"
    parts.append(text)
  return "\n".join(parts)


def metrics_markdown(comparison: Optional[SetComparison] = None, *,
                     validity: Optional[Mapping] = None,
                     extra: Optional[Mapping] = None,
                     c2st: Optional[Mapping[str, Mapping]] = None) -> str:
  """Markdown tables: per-feature OA/KL and means, validity, C2ST, extra scalars."""
  lines = []
  if comparison is not None:
    s = comparison.summary
    lines += ["## Music statistics", "",
              f"{s['n_generated']} generated vs {s['n_real']} real clips, "
              f"{s['n_features']} features. OA: overlapping area of the intra(real) and "
              "inter-set distance KDEs (1 = indistinguishable); KL: KL(intra || inter) in "
              "nats (0 = indistinguishable).", "",
              "| feature | unit | generated mean ± std | real mean ± std | intra real | "
              "inter | OA | KL | OA (intra gen) | KL (intra gen) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in comparison.stats.items():
      def ms(a, b):
        if isinstance(a, list):
          return f"{_fmt(a)}"
        return f"{_fmt(a)} ± {_fmt(b)}"
      lines.append("| " + " | ".join(_md_cell(c) for c in (
          name, st["unit"], ms(st["generated_mean"], st["generated_std"]),
          ms(st["real_mean"], st["real_std"]),
          ms(st["intra_real_mean"], st["intra_real_std"]),
          ms(st["inter_mean"], st["inter_std"]), _fmt(st["oa"]), _fmt(st["kl"]),
          _fmt(st["oa_generated"]), _fmt(st["kl_generated"]))) + " |")
    lines += ["", f"Mean OA {_fmt(s['oa_mean'])}, mean KL {_fmt(s['kl_mean'])} nats "
              f"(intra generated: OA {_fmt(s['oa_generated_mean'])}, "
              f"KL {_fmt(s['kl_generated_mean'])}).", ""]
  if validity is not None:
    lines += ["## Grammar validity", "", "| total | valid | rate | empty | errors |",
              "|---|---|---|---|---|",
              "| " + " | ".join(_md_cell(c) for c in (
                  validity["total"], validity["valid"], _fmt(validity["rate"]),
                  validity.get("empty", 0),
                  ", ".join(f"{k}: {v}" for k, v in validity.get("errors", {}).items())
                  or "none")) + " |", ""]
  if c2st:
    lines += [c2st_markdown(c2st)]
  if extra:
    lines += ["## Other metrics", "", "| metric | value |", "|---|---|"]
    for k, v in flatten_scalars(extra).items():
      lines.append(f"| {_md_cell(k)} | {_fmt(v, 4)} |")
    lines.append("")
  return "\n".join(lines)


def flatten_scalars(tree: Mapping, prefix: str = "") -> dict:
  """{"a/b/c": float} for every finite number in a nested mapping (lists skipped)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten_scalars(v, key))
    elif isinstance(v, (bool, np.bool_)):
      out[key] = float(v)
    elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
      out[key] = float(v)
  return out


def flat_scalars(comparison: Optional[SetComparison] = None, *,
                 validity: Optional[Mapping] = None, prefix: str = "eval") -> dict:
  """Headline scalars for TensorBoard: OA/KL per feature, summary means, validity rate."""
  out = {}
  if comparison is not None:
    for k, v in comparison.summary.items():
      out[f"{prefix}/music/{k}"] = float(v)
    for name, st in comparison.stats.items():
      for key in ("oa", "kl", "generated_mean"):
        if isinstance(st[key], float):
          out[f"{prefix}/music/{name}/{key}"] = st[key]
  if validity is not None:
    out[f"{prefix}/validity/rate"] = float(validity["rate"])
  return {k: v for k, v in out.items() if math.isfinite(v)}


def save_png(fig, path: PathLike) -> None:
  """Saves a figure as PNG through a temporary file and a rename."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)


def agg_figure(width: float, height: float):
  """A matplotlib Figure (inches) on an Agg canvas."""
  # Figure + Agg canvas directly: no pyplot global state, no GUI backend, thread-safe.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


_KDE_COLORS = ("tab:blue", "tab:orange", "tab:green")


def _figure_legend(fig, entries) -> None:
  # One legend per figure: a legend in each of ~15 panels doubles the drawing time.
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  fig.legend(handles=[Patch(color=c, label=l) for c, l in entries], loc="upper center",
             ncol=len(entries), fontsize=9, frameon=False)


def _adjust_grid(fig) -> None:
  # Fixed margins: tight_layout would draw the whole grid once more (twice the time).
  rows = max(1, round(fig.get_figheight() / 3.0))
  fig.subplots_adjust(left=0.05, right=0.98, wspace=0.3, hspace=0.85,
                      top=1 - 0.8 / (3.0 * rows), bottom=0.75 / (3.0 * rows))


def _grid_axes(fig, n: int, cols: int = 4):
  rows = max(1, math.ceil(n / cols))
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  for ax in axes[n:]:
    ax.set_visible(False)
  return axes[:n]


def plot_feature_histograms(comparison: SetComparison, path: PathLike,
                            group: Optional[str] = None) -> pathlib.Path:
  """One PNG: per feature, real vs generated values (histograms; mean ± std bars for vectors)."""
  names = [n for n in comparison.stats if group is None or FEATURES_BY_NAME[n].group == group]
  cols = 4
  fig = agg_figure(4.2 * cols, 3.0 * max(1, math.ceil(len(names) / cols)))
  for ax, name in zip(_grid_axes(fig, len(names), cols), names):
    g, r = comparison.generated[name], comparison.real[name]
    spec = FEATURES_BY_NAME[name]
    if spec.size == 0:
      both = np.concatenate([g, r])
      lo, hi = float(both.min()), float(both.max())
      bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
      ax.hist(r, bins=bins, alpha=0.55, density=True, color="tab:blue")
      ax.hist(g, bins=bins, alpha=0.55, density=True, color="tab:orange")
      ax.set_xlabel(spec.unit)
    else:
      x = np.arange(spec.size)
      ax.bar(x - 0.2, r.mean(0), 0.4, yerr=r.std(0), color="tab:blue", alpha=0.8)
      ax.bar(x + 0.2, g.mean(0), 0.4, yerr=g.std(0), color="tab:orange", alpha=0.8)
      labels = stats.feature_labels(name)
      if labels is not None:
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
      ax.set_ylabel(spec.unit)
    ax.set_title(name, fontsize=9)
  n_gen, n_real = len(next(iter(comparison.generated.values()))), len(
      next(iter(comparison.real.values())))
  _figure_legend(fig, [("tab:blue", f"real (n={n_real})"),
                       ("tab:orange", f"generated (n={n_gen})")])
  _adjust_grid(fig)
  path = pathlib.Path(path)
  save_png(fig, path)
  return path


def plot_distance_kdes(comparison: SetComparison, path: PathLike,
                       group: Optional[str] = None, grid_size: int = 512) -> pathlib.Path:
  """One PNG: per feature, KDEs of intra(real), intra(generated) and inter distances."""
  names = [n for n in comparison.stats if group is None or FEATURES_BY_NAME[n].group == group]
  cols = 4
  fig = agg_figure(4.2 * cols, 3.0 * max(1, math.ceil(len(names) / cols)))
  for ax, name in zip(_grid_axes(fig, len(names), cols), names):
    series = (("intra real", comparison.intra_real[name]),
              ("intra generated", comparison.intra_generated[name]),
              ("inter", comparison.inter[name]))
    nonempty = [d for _, d in series if len(d)]
    if nonempty:
      both = np.concatenate(nonempty)
      lo, hi = float(both.min()), float(both.max())
      pad = max(0.05 * (hi - lo), 3 * max(stats.scott_bandwidth(d) for _, d in series),
                1e-6 * max(abs(hi), 1.0))
      grid = np.linspace(lo - pad, hi + pad, grid_size)
      for (label, d), color in zip(series, _KDE_COLORS):
        if len(d):
          ax.plot(grid, stats.kde_on_grid(d, grid) / (grid[1] - grid[0]), color=color)
    st = comparison.stats[name]
    ax.set_title(f"{name}\nOA {_fmt(st['oa'])}  KL {_fmt(st['kl'])}", fontsize=8)
    ax.set_xlabel(f"distance ({FEATURES_BY_NAME[name].unit})", fontsize=7)
  _figure_legend(fig, list(zip(_KDE_COLORS, ("intra real", "intra generated", "inter"))))
  _adjust_grid(fig)
  path = pathlib.Path(path)
  save_png(fig, path)
  return path


def plot_pianoroll(notes: Notes, path: PathLike, *, title: Optional[str] = None,
                   seconds: Optional[float] = None) -> pathlib.Path:
  """Piano-roll PNG of one clip: pitched notes as bars, drum hits as dots per GrooVAE class.

  Args:
    notes: the clip.
    path: PNG to write.
    title: shown above the roll (plain text).
    seconds: x-axis length (default: end of the last note).
  """
  from matplotlib.collections import LineCollection  # pylint: disable=g-import-not-at-top
  is_drum = np.asarray(notes.is_drum, bool)
  pitched, drums = notes.select(~is_drum), notes.select(is_drum)
  n_axes = int(len(pitched) > 0) + int(len(drums) > 0) or 1
  fig = agg_figure(10, 2.2 + 1.8 * n_axes)
  axes = fig.subplots(n_axes, 1, squeeze=False).reshape(-1)
  end = seconds if seconds else max(notes.total_time, 1e-3)
  i = 0
  if len(pitched) or not len(drums):
    ax = axes[i]
    i += 1
    if len(pitched):
      segs = np.stack([np.stack([pitched.start, pitched.pitch], -1),
                       np.stack([pitched.end, pitched.pitch], -1)], 1)
      colors = np.zeros((len(pitched), 4))
      colors[:, 2] = 0.6
      colors[:, 3] = 0.35 + 0.65 * pitched.velocity / 127.0
      ax.add_collection(LineCollection(segs, colors=colors, linewidths=3))
      ax.set_ylim(pitched.pitch.min() - 2, pitched.pitch.max() + 2)
    ax.set_ylabel("MIDI pitch")
    ax.set_xlim(0, end)
  if len(drums):
    ax = axes[i]
    cls, names = stats.groovae_classes(drums.pitch), stats.drum_class_names()
    ax.scatter(drums.start, cls, s=6 + 30 * drums.velocity / 127.0, c="tab:red",
               alpha=0.8, marker="o")
    # Row -1 holds pitches outside the GrooVAE map.
    ax.set_yticks(range(-1, len(names)), ("other",) + names, fontsize=7)
    ax.set_ylim(-1.5, len(names))
    ax.set_ylabel("drum class")
    ax.set_xlim(0, end)
  axes[-1].set_xlabel("time (s)")
  if title:
    axes[0].set_title(title, fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  save_png(fig, path)
  return path


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def beat_grid(seconds: float, qpm: float = 120.0, meter: tuple = (4, 4)) -> tuple:
  """(beat times, bar times) in seconds from 0 to `seconds` at a constant tempo: a beat
  is one 1/denominator note (a dotted quarter in 6/8, 9/8, 12/8), a bar `numerator`
  1/denominator notes, the first bar line at 0."""
  num, den = int(meter[0]), int(meter[1])
  unit = 60.0 / qpm * 4.0 / den  # seconds per 1/den note
  bar = unit * num
  beat = unit * 3 if den == 8 and num % 3 == 0 and num > 3 else unit
  beats = np.arange(0.0, seconds + 1e-9, beat)
  bars = np.arange(0.0, seconds + 1e-9, bar)
  return beats, bars


def plot_continuations(prompt: Notes, continuations: Mapping[str, Notes], path: PathLike, *,
                       prompt_end: float, seconds: Optional[float] = None,
                       qpm: float = 120.0, meter: tuple = (4, 4),
                       title: Optional[str] = None) -> pathlib.Path:
  """Piano-roll PNG of a prompt and its continuations, one panel per continuation, on one
  clock with the beat and bar grid drawn.

  Each panel shows the prompt (grey) and then one continuation (coloured), so the real
  continuation and generated ones line up bar by bar. Drum hits are dots on GrooVAE's 9
  class rows (size and shade by velocity); pitched notes are bars at their pitch.

  Args:
    prompt: the prompt's notes; time 0 is a bar line.
    continuations: {label: notes} (e.g. "real", "generated 1"), on the prompt's clock.
    path: PNG to write.
    prompt_end: seconds where the prompt ends (a dashed line).
    seconds: x-axis length (default: the last onset, rounded up to a bar line).
    qpm, meter: the piece's tempo and (numerator, denominator), for the grid.
    title: shown above the first panel.
  """
  from matplotlib.collections import LineCollection  # pylint: disable=g-import-not-at-top
  everything = [prompt] + list(continuations.values())
  drums = sum(int(np.asarray(n.is_drum, bool).sum()) for n in everything)
  total = sum(len(n) for n in everything)
  is_drum_plot = total > 0 and drums * 2 >= total
  bar_s = 60.0 / qpm * 4.0 / meter[1] * meter[0]
  last = max([float(n.start.max()) for n in everything if len(n)] + [prompt_end])
  end = seconds if seconds else math.ceil((last + 1e-6) / bar_s) * bar_s
  beats, bars = beat_grid(end, qpm, meter)
  names = stats.drum_class_names()
  if not is_drum_plot:
    pitches = np.concatenate([n.pitch for n in everything if len(n)] or [np.array([60])])
  rows = len(continuations)
  fig = agg_figure(12, 0.6 + 2.0 * rows)
  axes = fig.subplots(rows, 1, squeeze=False, sharex=True).reshape(-1)
  colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
  for k, (ax, (label, cont)) in enumerate(zip(axes, continuations.items())):
    for t in beats:
      ax.axvline(t, color="0.88", lw=0.6, zorder=0)
    for t in bars:
      ax.axvline(t, color="0.55", lw=1.1, zorder=0)
    ax.axvline(prompt_end, color="k", lw=1.2, ls="--", zorder=1)
    for notes, color in ((prompt, "0.45"), (cont, colors[k % len(colors)])):
      if not len(notes):
        continue
      if is_drum_plot:
        sel = notes.select(np.asarray(notes.is_drum, bool))
        vel = sel.velocity.astype(np.float64) / 127.0
        ax.scatter(sel.start, stats.groovae_classes(sel.pitch), s=4 + 40 * vel, c=color,
                   alpha=0.9, marker="o", linewidths=0, zorder=2)
      else:
        segs = np.stack([np.stack([notes.start, notes.pitch], -1),
                         np.stack([notes.end, notes.pitch], -1)], 1)
        ax.add_collection(LineCollection(segs, colors=color, linewidths=2.5, zorder=2))
    if is_drum_plot:
      ax.set_yticks(range(-1, len(names)), ("other",) + names, fontsize=7)
      ax.set_ylim(-1.5, len(names) - 0.5)
    else:
      ax.set_ylim(pitches.min() - 2, pitches.max() + 2)
      ax.set_ylabel("MIDI pitch")
    ax.set_xlim(0, end)
    ax.text(1.0, 1.02, label, transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
            color=colors[k % len(colors)])
  axes[0].text(0.0, 1.02, "prompt (grey) | continuation", transform=axes[0].transAxes,
               ha="left", va="bottom", fontsize=8, color="0.3")
  if title:
    axes[0].set_title(title, fontsize=10, pad=14)
  ax = axes[-1]
  ax.set_xticks(bars, [str(i + 1) for i in range(len(bars))], fontsize=7)
  ax.set_xlabel(f"bar (thin lines: beats; {qpm:g} qpm, {meter[0]}/{meter[1]})")
  fig.tight_layout()
  path = pathlib.Path(path)
  save_png(fig, path)
  return path


def write_reports(out_dir: PathLike, comparison: Optional[SetComparison] = None, *,
                  validity: Optional[Mapping] = None, extra: Optional[Mapping] = None,
                  examples: Optional[Mapping[str, Notes]] = None,
                  max_examples: int = 4,
                  c2st: Optional[Mapping[str, Mapping]] = None) -> dict:
  """Writes metrics.json, metrics.md and PNG plots into `out_dir`.

  Args:
    out_dir: created if missing.
    comparison: from `compare_sets` (feature histograms and distance KDE plots per group).
    validity: from `grammar_validity`.
    extra: other JSON-able metrics (e.g. NLL) merged into metrics.json and listed in
      metrics.md.
    examples: {name: clip} for piano-roll images (the first `max_examples`).
    c2st: {continuation length: `two_sample.c2st` result} (a table per length).

  Returns:
    {"metrics_json", "metrics_md", "plots": [paths]}.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  doc = metrics_dict(comparison, validity=validity, extra=extra, c2st=c2st)
  json_path = out / "metrics.json"
  # Through a rename: an interrupted write leaves the previous report whole.
  _write_atomic(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
  md_path = out / "metrics.md"
  _write_atomic(md_path, "# Evaluation\n\n" + metrics_markdown(
      comparison, validity=validity, extra=extra, c2st=c2st))
  plots = []
  if comparison is not None:
    for group in comparison.groups:
      plots.append(plot_feature_histograms(comparison, out / f"features_{group}.png", group))
      plots.append(plot_distance_kdes(comparison, out / f"distances_{group}.png", group))
  for k, (name, clip) in enumerate(list((examples or {}).items())[:max_examples]):
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]
    plots.append(plot_pianoroll(clip, out / f"pianoroll_{k:02d}_{safe}.png", title=str(name)))
  return {"metrics_json": json_path, "metrics_md": md_path, "plots": plots}
