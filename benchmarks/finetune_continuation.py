#!/usr/bin/env python3
"""Pretrain, then fine-tune for drum continuation, versus the same model from scratch.

End to end with the `midijax` commands (each printed before it runs):

1. Builds groove/drums (all GMD styles, full performances) and the continuation pairs
   of one style or drummer (groove/drums_continuation_<style>: 2 prompt bars, then the
   next 2 bars as the target).
2. Pretrains configs/groove_small.py on groove/drums (or reuses --pretrained RUN).
3. Fine-tunes it on the pairs (configs/groove_continuation.py:finetune, init_from the
   pretrained run's best checkpoint, every parameter trained), and again with LoRA
   (configs/groove_continuation.py:lora: rank-8 adapters, only they trained), whose best
   checkpoint `midijax export` then merges into a plain model.
4. Trains the same model on the same pairs for the same steps from a random start
   (configs/groove_continuation.py:scratch).
5. Scores the continuation NLL (per token and per note) of the subset's test pairs for
   the pretrained model before fine-tuning, the fine-tuned ones (and the merged LoRA
   export, which must score what the LoRA run scores) and the one from scratch, all on
   the same 384-token windows (`midijax evaluate --task continuation`), and lays the runs
   side by side (`midijax compare-runs`).

Writes ROOT/results.json and ROOT/results.md (the README table), ROOT/curves.png, and
prints the JSON as its last line. On the 2-core CPU machine the default (`--scale small`)
takes about 30 minutes; `--scale tiny` (groove_tiny-size models, a few steps) checks the
whole path in a few minutes:

    python benchmarks/finetune_continuation.py --root workdirs/continuation \\
        --data_dir workdirs/tfds --manual_dir ../shared/data/groove
    python benchmarks/finetune_continuation.py --scale tiny --root /tmp/continuation_tiny
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The window every model is scored on (tokens): configs/groove_continuation.py's seq_len.
SEQ_LEN = 384
# The merged LoRA export scores what the LoRA run scores, up to float32 rounding.
MERGED_TOLERANCE = 1e-4


def run(cmd, log):
  """Runs one midijax command from the repository root; returns its wall seconds."""
  line = " ".join(str(c) for c in cmd)
  print(f"\n$ {line}", flush=True)
  log.append(line)
  t = time.perf_counter()
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-m", "midijax.cli", *[str(c) for c in cmd]], check=True,
                 cwd=REPO, env=env)
  return time.perf_counter() - t


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def directory_bytes(path) -> int:
  """Bytes of the files under a local folder."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def best_eval(workdir):
  """(best validation NLL per token, its step) from the run's metrics.jsonl."""
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
          if l.strip()]
  evals = [(r["eval_loss"], r["step"]) for r in rows if "eval_loss" in r]
  return min(evals) if evals else (None, None)


def markdown(result) -> str:
  """The results table (README-ready)."""
  lines = [f"Continuation NLL on the {result['subset']} test pairs of the Groove MIDI Dataset "
           f"({result['test_pairs']} prompts of 2 bars, {result['target_tokens']:,} target "
           f"tokens, {result['seq_len']}-token windows); {result['machine']}, "
           f"{result['date']}, scale {result['scale']}.", "",
           "| model | init | trained parameters | checkpoint | steps | train time "
           "| best val NLL (step) | test NLL / token | test NLL / note |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for row in result["rows"]:
    val = (f"{row['best_val_nll']:.4f} ({row['best_step']})"
           if row.get("best_val_nll") is not None else "-")
    train = (f"{row['train_seconds'] / 60:.1f} min" if row.get("train_seconds") is not None
             else "-")
    size = (f"{row['checkpoint_bytes'] / 2**20:.2f} MiB" if row.get("checkpoint_bytes")
            else "-")
    lines.append(f"| {row['model']} | {row['init']} | {row['trainable_params']:,} | {size} | "
                 f"{row['steps']} | {train} | {val} | {row['test_nll_per_token']:.4f} | "
                 f"{row['test_nll_per_note']:.4f} |")
  merged = result.get("lora_export")
  if merged:
    lines += ["", f"Checkpoint: one training checkpoint (parameters + the optimizer state of "
              f"the trained ones). The LoRA run's best checkpoint exported with its adapters "
              f"merged (`midijax export`): {merged['params']:,} parameters, "
              f"{merged['bytes'] / 2**20:.2f} MiB, test NLL {merged['test_nll_per_token']:.4f} "
              f"/ token (the LoRA run's: {merged['lora_test_nll_per_token']:.4f})."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--scale", choices=("small", "tiny"), default="small",
                  help="small: groove_small, the README experiment (~30 min on 2 cores); "
                       "tiny: groove_tiny-size models and a few steps (a check)")
  ap.add_argument("--root", default=str(REPO / "workdirs" / "continuation"),
                  help="folder of the runs and results")
  ap.add_argument("--data_dir", default=None, help="TFDS data dir (default ROOT/tfds)")
  ap.add_argument("--manual_dir", default=str(REPO.parent / "shared" / "data" / "groove"),
                  help="the extracted GMD folder (info.csv + drummerN/)")
  who = ap.add_mutually_exclusive_group()
  who.add_argument("--style", default=None, help="fine-tune on this GMD style (default funk)")
  who.add_argument("--drummer", default=None, help="... or on this drummer, e.g. drummer1")
  ap.add_argument("--pretrained", default=None,
                  help="an existing pretrained run to start from (skips pretraining)")
  ap.add_argument("--pretrain_steps", type=int, default=None,
                  help="pretraining steps (default: the config's; tiny: 40)")
  ap.add_argument("--steps", type=int, default=None,
                  help="fine-tuning / from-scratch steps (default: the config's)")
  a = ap.parse_args(argv)

  root = pathlib.Path(a.root).absolute()
  data_dir = pathlib.Path(a.data_dir).absolute() if a.data_dir else root / "tfds"
  tiny = a.scale == "tiny"
  field, value = ("drummers", a.drummer) if a.drummer else ("styles", a.style or "funk")
  dataset = f"drums_continuation_{value}"
  suffix = ",tiny" if tiny else ""
  commands, seconds = [], {}
  started = time.perf_counter()
  root.mkdir(parents=True, exist_ok=True)

  # 1. Data.
  seconds["build"] = run(["build-data", "groove", "--config", "drums", "--manual_dir",
                          a.manual_dir, "--data_dir", data_dir], commands)
  seconds["build"] += run(["build-data", "groove", "--config", "drums_continuation", "--set",
                           f"{field}={value}", "--name", dataset, "--manual_dir", a.manual_dir,
                           "--data_dir", data_dir], commands)
  data = [f"--config.data.data_dir={data_dir}"]

  # 2. Pretraining on every style.
  pretrained = pathlib.Path(a.pretrained).absolute() if a.pretrained else root / "pretrained"
  if not a.pretrained:
    pre_config = REPO / "configs" / ("groove_tiny.py" if tiny else "groove_small.py")
    extra = data + [f"--config.model.max_len={SEQ_LEN}"] if tiny else list(data)
    steps = a.pretrain_steps or (40 if tiny else None)
    if steps:
      extra += [f"--config.train.num_steps={steps}",
                f"--config.train.eval_every={max(steps // 2, 1)}",
                f"--config.train.checkpoint_every={max(steps // 2, 1)}"]
    seconds["pretrain"] = run(["train", f"--config={pre_config}", f"--workdir={pretrained}",
                               *extra], commands)

  # 3-4. Fine-tuning and from scratch: same model, data and steps.
  runs = {"finetune": ("fine-tuned, all parameters", f"{pretrained}:best"),
          "lora": ("fine-tuned, LoRA adapters (rank 8)", f"{pretrained}:best"),
          "scratch": ("from scratch", "random")}
  overrides = data + [f"--config.data.builder_config={dataset}"]
  if a.steps:
    overrides.append(f"--config.train.num_steps={a.steps}")
  for name in runs:
    extra = list(overrides)
    if name != "scratch":
      extra.append(f"--config.train.init_from={pretrained}:best")
    seconds[name] = run(["train", f"--config={REPO / 'configs' / 'groove_continuation.py'}:"
                         f"{name}{suffix}", f"--workdir={root / name}", *extra], commands)
  # The LoRA run's adapters merged into a plain model (scored below like the others).
  merged_dir = root / "lora_merged"
  shutil.rmtree(merged_dir, ignore_errors=True)  # export refuses to overwrite a run
  run(["export", "--workdir", root / "lora", "--best", "--out", merged_dir], commands)

  # 5. Continuation NLL on the subset's test pairs: the same windows for every model.
  scored = {}
  for name, workdir in ([("pretrained", pretrained)] + [(n, root / n) for n in runs]
                        + [("lora_merged", merged_dir)]):
    out = root / "eval" / name
    run(["evaluate", "--task", "continuation", "--workdir", workdir, "--best", "--data",
         f"groove/{dataset}", "--split", "test", "--seq_len", SEQ_LEN, "--data_dir", data_dir,
         "--out", out], commands)
    scored[name] = read_json(out / f"continuation_{dataset}_test.json")
  run(["compare-runs", *[root / n for n in runs], "--out", root / "curves.png"], commands)

  rows = []
  labels = {"pretrained": ("pretrained on all styles, before fine-tuning", "random")}
  labels.update(runs)
  order = ["pretrained", "finetune", "lora", "scratch"]
  for name in order:
    workdir = pretrained if name == "pretrained" else root / name
    info = read_json(workdir / "run_info.json")
    best, best_step = best_eval(workdir)
    s = scored[name]
    rows.append({
        "model": labels[name][0], "run": name, "workdir": str(workdir),
        "init": "pretrained" if name in ("finetune", "lora") else "random",
        "trainable_params": info["params"]["trainable"],
        "checkpoint_bytes": info.get("checkpoint_bytes"), "steps": info.get("steps"),
        "train_seconds": seconds.get(name if name != "pretrained" else "pretrain"),
        "best_val_nll": best, "best_step": best_step,
        "test_nll_per_token": s["nll_per_token"], "test_nll_per_note": s["nll_per_note"],
        "checkpoint_step": s["step"]})
  lora_info = read_json(root / "lora" / "run_info.json")
  lora_export = {
      "workdir": str(merged_dir),
      "exported_from": read_json(merged_dir / "run_info.json").get("exported_from"),
      # Only the adapters trained, and merging removes them: what is left is the base model.
      "params": lora_info["params"]["total"] - lora_info["params"]["trainable"],
      "bytes": directory_bytes(merged_dir / "checkpoints"),
      "test_nll_per_token": scored["lora_merged"]["nll_per_token"],
      "test_nll_per_note": scored["lora_merged"]["nll_per_note"],
      "lora_test_nll_per_token": scored["lora"]["nll_per_token"]}
  lora_export["matches"] = (abs(lora_export["test_nll_per_token"]
                                - lora_export["lora_test_nll_per_token"]) <= MERGED_TOLERANCE)
  if not lora_export["matches"]:
    print(f"WARNING: the merged LoRA export scores {lora_export['test_nll_per_token']:.6f} "
          f"nats/token, the LoRA run {lora_export['lora_test_nll_per_token']:.6f}",
          file=sys.stderr, flush=True)
  first = scored["pretrained"]
  result = {
      "bench": "finetune_continuation", "scale": a.scale, "subset": f"{field[:-1]} {value}",
      "dataset": f"groove/{dataset}", "test_pairs": first["pairs"],
      "target_tokens": int(first["tokens"]), "cut_targets": first["cut_targets"],
      "seq_len": SEQ_LEN, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "date": datetime.date.today().isoformat(), "rows": rows, "lora_export": lora_export,
      "seconds": {k: round(v, 1) for k, v in seconds.items()},
      "total_seconds": round(time.perf_counter() - started, 1), "commands": commands}
  (root / "results.json").write_text(json.dumps(result, indent=1) + "\n")
  (root / "results.md").write_text(markdown(result))
  print("\n" + markdown(result))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
