"""Recorded runs side by side (`compare_runs`) and run again (`reproduce`).

Both read only what training leaves in a workdir: config.json (the config as run),
run_info.json (git commit, package versions, devices, parameter counts, wall time,
init_from), metrics.jsonl (one row per logged step: train_loss, tokens_per_s, eval_loss,
eval_nll_per_note, ...), best.json and vocab.json.

    midijax compare-runs W1 W2 ... [--out curves.png] [--json]
    midijax reproduce WORKDIR --workdir NEW
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Dict, List, Optional, Sequence

from midijax.errors import MidijaxError


# ----------------------------------------------------------------------------- reading runs
def _read_json(path: pathlib.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise MidijaxError(f"{path}: cannot read the run's {what} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """{"train.learning_rate": 0.001, ...} of a nested dict (lists and tuples are values)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


@dataclasses.dataclass
class RunRecord:
  """What a workdir says about its run.

  Attributes:
    workdir: the folder; name: its last component.
    config: the flattened config.json.
    info: run_info.json ({} when absent).
    rows: metrics.jsonl rows.
    vocab: vocab.json's token names (None when absent).
  """
  workdir: str
  name: str
  config: Dict[str, Any]
  info: Dict[str, Any]
  rows: List[Dict[str, Any]]
  vocab: Optional[List[str]]

  def curve(self, key: str) -> List[tuple]:
    """[(step, value)] of the rows that have `key`."""
    return [(int(r["step"]), float(r[key])) for r in self.rows if key in r]


def read_run(workdir) -> RunRecord:
  """Reads a run folder's records.

  Raises:
    MidijaxError: the folder is not a midijax run (no config.json), or a record is damaged.
  """
  path = pathlib.Path(workdir)
  if not path.is_dir():
    raise MidijaxError(f"{path}: no such folder")
  if not (path / "config.json").is_file():
    raise MidijaxError(f"{path}: not a midijax run (no config.json; a run folder is what "
                       "`midijax train --workdir` writes)")
  config = flatten(_read_json(path / "config.json", "config"))
  info = _read_json(path / "run_info.json", "run_info.json") if (
      path / "run_info.json").is_file() else {}
  rows = []
  if (path / "metrics.jsonl").is_file():
    for n, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except ValueError:
          raise MidijaxError(f"{path / 'metrics.jsonl'}: line {n} is not JSON") from None
  vocab = None
  if (path / "vocab.json").is_file():
    vocab = _read_json(path / "vocab.json", "vocabulary").get("tokens")
  return RunRecord(os.fspath(path), path.name or os.fspath(path), config, info, rows, vocab)


# ----------------------------------------------------------------------------- compare
def config_differences(base: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
  """The flattened fields whose values differ ({field: other's value, "-" if absent})."""
  return {k: other.get(k, "-") for k in sorted(set(base) | set(other))
          if base.get(k, "-") != other.get(k, "-")}


def _median(values: Sequence[float]) -> Optional[float]:
  values = sorted(v for v in values if math.isfinite(v))
  if not values:
    return None
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def compare_runs(workdirs: Sequence, out_png=None) -> Dict[str, Any]:
  """Lays runs side by side.

  Args:
    workdirs: run folders; the first is the reference for config differences.
    out_png: where to draw the validation curves (None: no plot).

  Returns:
    {"metric": "eval_loss" (NLL per token) or "eval_nll_per_note" (when the runs' encodings
    differ), "comparable_per_token": bool, "runs": [{"workdir", "name", "differences",
    "best", "best_step", "steps", "tokens_per_s", "wall_seconds", "params",
    "trainable_params", "encoding"}], "plot": path or None}.

  Raises:
    MidijaxError: a folder is not a run (nothing is written then).
  """
  if not workdirs:
    raise MidijaxError("give at least one run folder")
  records = [read_run(w) for w in workdirs]
  names = [r.name for r in records]
  for r in records:  # folders of the same name: add their parents
    if names.count(r.name) > 1:
      r.name = "/".join(pathlib.Path(r.workdir).parts[-2:])
  vocabularies = {json.dumps(r.vocab) for r in records}
  per_token = len(vocabularies) == 1 and records[0].vocab is not None
  metric = "eval_loss" if per_token else "eval_nll_per_note"
  runs = []
  for r in records:
    curve = r.curve(metric)
    best = min(curve, key=lambda sv: sv[1]) if curve else None
    steps = max([int(row["step"]) for row in r.rows] or [int(r.info.get("steps", 0))])
    params = r.info.get("params") or {}
    runs.append({
        "workdir": r.workdir, "name": r.name,
        "differences": config_differences(records[0].config, r.config),
        "best": best[1] if best else None, "best_step": best[0] if best else None,
        "steps": steps,
        "tokens_per_s": _median([float(row["tokens_per_s"]) for row in r.rows
                                 if "tokens_per_s" in row]),
        "wall_seconds": r.info.get("wall_seconds"),
        "params": params.get("total"), "trainable_params": params.get("trainable"),
        "encoding": r.config.get("data.builder_config"),
    })
  plot = None
  if out_png is not None:
    plot = plot_curves(records, metric, out_png)
  return {"metric": metric, "comparable_per_token": per_token, "runs": runs,
          "plot": os.fspath(plot) if plot else None}


def plot_curves(records: Sequence[RunRecord], metric: str, out_png) -> pathlib.Path:
  """Draws each run's validation `metric` against steps into `out_png` (PNG)."""
  from midijax.reports import agg_figure  # pylint: disable=g-import-not-at-top  # matplotlib
  fig = agg_figure(7.5, 4.5)
  ax = fig.subplots()
  for r in records:
    curve = r.curve(metric)
    if curve:
      ax.plot(*zip(*curve), "o-", lw=1.5, ms=3, label=r.name)
  ax.set_xlabel("step")
  ax.set_ylabel("validation NLL per token (nats)" if metric == "eval_loss" else
                "validation NLL per note (nats; encodings differ)")
  ax.grid(alpha=0.3)
  if any(r.curve(metric) for r in records):
    ax.legend()
  fig.tight_layout()
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  with open(tmp, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  os.replace(tmp, out)
  return out


def _fmt(value, spec: str = "") -> str:
  if value is None:
    return "n/a"
  return format(value, spec) if spec else str(value)


def _fmt_seconds(seconds) -> str:
  if seconds is None:
    return "n/a"
  seconds = float(seconds)
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def format_comparison(result: Dict[str, Any]) -> str:
  """The text table `midijax compare-runs` prints."""
  unit = "nats/token" if result["comparable_per_token"] else "nats/note"
  lines = []
  if not result["comparable_per_token"]:
    lines.append("runs use different encodings: NLL per token is not comparable between "
                 "them; best validation NLL per note shown")
  header = ["run", f"best val NLL ({unit})", "at step", "steps", "tokens/s", "wall",
            "differences from the first run"]
  rows = []
  for i, run in enumerate(result["runs"]):
    diffs = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                      for k, v in run["differences"].items())
    rows.append([run["name"], _fmt(run["best"], ".4f"), _fmt(run["best_step"]),
                 _fmt(run["steps"]), _fmt(run["tokens_per_s"], ",.0f"),
                 _fmt_seconds(run["wall_seconds"]),
                 "(reference)" if i == 0 else (diffs or "(same config)")])
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt_row = lambda row: "  ".join(
      str(c).ljust(w) if j in (0, len(row) - 1) else str(c).rjust(w)
      for j, (c, w) in enumerate(zip(row, widths))).rstrip()
  lines += [fmt_row(header), fmt_row(["-" * w for w in widths])]
  lines += [fmt_row(r) for r in rows]
  if result.get("plot"):
    lines.append(f"validation curves: {result['plot']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- reproduce
def environment_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
  """One line per difference between two run_info records: git commit, uncommitted
  changes, each package version, Python, devices and process count."""
  out = []
  if recorded.get("git_commit") != current.get("git_commit"):
    out.append(f"git commit: {recorded.get('git_commit') or 'unknown'} when recorded, "
               f"{current.get('git_commit') or 'unknown'} now")
  if current.get("git_dirty"):
    out.append("the working tree has uncommitted changes now: the code may differ from its "
               "commit")
  old_v, new_v = recorded.get("versions") or {}, current.get("versions") or {}
  for pkg in sorted(set(old_v) | set(new_v)):
    if old_v.get(pkg) != new_v.get(pkg):
      out.append(f"{pkg}: {old_v.get(pkg, 'not installed')} when recorded, "
                 f"{new_v.get(pkg, 'not installed')} now")
  for key, what in (("python", "Python"), ("devices", "devices"),
                    ("process_count", "process count")):
    if key in recorded and recorded.get(key) != current.get(key):
      out.append(f"{what}: {recorded.get(key)} when recorded, {current.get(key)} now")
  return out


def reproduce(workdir, new_workdir, *, log=print, warn=None) -> Dict[str, Any]:
  """Trains the config recorded in `workdir` again, from scratch, in `new_workdir`.

  Warns (one line each, through `warn`; default: `log` with a "warning: " prefix) about
  every difference between run_info.json and this machine's git commit, package
  versions, Python and devices; with none, the new run's checkpoints equal the
  original's bit for bit (same seed, same data order, same programs). An init_from is
  pinned to the checkpoint step the original run recorded. For an export (`midijax
  export`), the run it was exported from is trained again (its config, recorded in the
  export's run_info.json).

  Returns:
    The new run's final metrics (`train.train_and_evaluate`).

  Raises:
    MidijaxError: `workdir` is not a run, or `new_workdir` is it or already holds a run.
  """
  from midijax import train  # pylint: disable=g-import-not-at-top  # JAX
  import ml_collections  # pylint: disable=g-import-not-at-top
  warn = warn or (lambda line: log(f"warning: {line}"))
  src, new = pathlib.Path(workdir).absolute(), pathlib.Path(new_workdir).absolute()
  record = read_run(src)
  if new == src:
    raise MidijaxError(f"--workdir {new}: is the run being reproduced; give a new folder")
  if (new / "config.json").exists() or (new / "checkpoints").exists():
    raise MidijaxError(f"--workdir {new}: already holds a run; give a new folder")
  config = ml_collections.ConfigDict(_read_json(src / "config.json", "config"))
  exported = record.info.get("exported_from") or {}
  if exported:
    # An export's config.json describes the exported model (e.g. LoRA merged, lora_rank 0),
    # not the training that made it: train the source's config, which the export records.
    if not isinstance(exported.get("config"), dict):
      raise MidijaxError(f"{src}: an export of {exported.get('workdir')} (step "
                         f"{exported.get('step')}) that does not record its source's config; "
                         f"reproduce {exported.get('workdir')} instead")
    config = ml_collections.ConfigDict(exported["config"])
    log(f"{src} is an export of {exported.get('workdir')} at step {exported.get('step')}: "
        f"training that run's config; `midijax export --workdir {new} --step "
        f"{exported.get('step')} --out DIR` then makes the same export")
  if not record.info:
    warn(f"{src}: no run_info.json, so the code and package versions it ran with are "
         "unknown")
  for line in environment_differences(record.info, train.run_info()) if record.info else []:
    warn(line)
  if float(config.train.get("max_seconds", 0) or 0) > 0:
    warn(f"config.train.max_seconds={config.train.max_seconds}: the run stops after a "
         "wall-clock time, so the new run may stop at another step")
  init = record.info.get("init_from") or {}
  if config.train.get("init_from") and init.get("workdir") and init.get("step") is not None:
    pinned = f"{init['workdir']}:{init['step']}"
    if pinned != config.train.init_from:
      log(f"init_from {config.train.init_from!r} pinned to {pinned!r}, the step the run "
          "started from")
      config.train.init_from = pinned
  log(f"reproducing {src} in {new}")
  metrics = train.train_and_evaluate(config, os.fspath(new))
  info_path = new / "run_info.json"
  if info_path.is_file():
    info = json.loads(info_path.read_text())
    info["reproduced_from"] = os.fspath(src)
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, info_path)
  return metrics
