"""The shape of midijax/: imports flow forward through the stages, without cycles or
private names, and the light commands stay light.

Every import in midijax/ counts, at module level or inside a function (a lazy import is
still a dependency). Stages, lowest first (a module may import its own stage or lower):

  0 base       errors, notes, allocator, limits, process_env
  1 encoding   encoding.*, midi_io                          (numpy only: no JAX)
  2 data       input_pipeline, music_stats, two_sample, reports, metric_writers, ngram
  3 model      sharding, kernels.*, models.*
  4 runtime    checkpoint, losses, runs, constraints, finetune
  5 train      train, aot, sampling, generation
  6 evaluate   evaluation, export, experiments
  7 command    cli
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "midijax"

STAGES = {
    "errors": 0, "notes": 0, "allocator": 0, "limits": 0, "process_env": 0,
    "encoding": 1, "midi_io": 1,
    "input_pipeline": 2, "music_stats": 2, "reports": 2, "metric_writers": 2, "ngram": 2,
    "two_sample": 2,
    "sharding": 3, "kernels": 3, "models": 3,
    "checkpoint": 4, "losses": 4, "runs": 4, "constraints": 4, "finetune": 4,
    "train": 5, "aot": 5, "sampling": 5, "generation": 5,
    "evaluation": 6, "export": 6, "experiments": 6,
    "cli": 7,
}
# Modules that must never import training (they load runs through midijax.runs). The CLI
# imports it only in the function of `midijax train`.
NEVER_IMPORT_TRAIN = ("sampling", "evaluation", "export", "encoding", "generation", "runs")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, known: set) -> list:
  """[(imported midijax module, names taken from it, line)] of one module."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("midijax")]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      if not base.startswith("midijax"):
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:  # `from midijax import train`: the module itself
          out.append((sub, [], node.lineno))
        else:
          out.append((base, [alias.name], node.lineno))
  return out


def graph():
  mods = modules()
  known = set(mods)
  return mods, {name: imports_of(name, path, known) for name, path in mods.items()}


def stage_of(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:  # the package itself
    return 0
  return STAGES[parts[1]]


def test_every_module_has_a_stage():
  missing = [m for m in modules() if m != "midijax" and m.split(".")[1] not in STAGES]
  assert not missing, f"give these modules a stage in tests/test_imports.py: {missing}"


def test_no_import_cycles():
  _, edges = graph()
  deps = {m: {t for t, _, _ in e if t != m} for m, e in edges.items()}
  # Imports of a package's own submodules from its __init__ are not cycles of stages.
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "active"
    stack.append(m)
    for t in sorted(deps.get(m, ())):
      if t == "midijax" or t.startswith(m + "."):  # a package and its own submodules
        continue
      if state.get(t) == "active":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(deps):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_flow_forward_through_the_stages():
  _, edges = graph()
  backward = [f"{m} (stage {stage_of(m)}) imports {t} (stage {stage_of(t)}) at line {line}"
              for m, e in edges.items() for t, _, line in e
              if t != "midijax" and stage_of(t) > stage_of(m)]
  assert not backward, "\n".join(backward)


def test_runs_are_loaded_without_training():
  _, edges = graph()
  bad = [f"{m} imports {t} (line {line})" for m, e in edges.items() for t, _, line in e
         if t == "midijax.train" and m.split(".")[1] in NEVER_IMPORT_TRAIN]
  assert not bad, "\n".join(bad)
  tree = ast.parse((PACKAGE / "cli.py").read_text())
  for function in ast.walk(tree):
    if isinstance(function, ast.FunctionDef) and function.name != "run_train":
      for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and node.module == "midijax":
          assert "train" not in [a.name for a in node.names], (function.name, node.lineno)
  top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert not any("train" in [a.name for a in n.names] for n in top)


def test_no_module_uses_another_modules_private_names():
  mods, edges = graph()
  bad = [f"{m} imports {t}.{n} (line {line})" for m, e in edges.items() for t, names, line in e
         for n in names if n.startswith("_") and not n.startswith("__")]
  # Attribute access through an imported module: `module._name`.
  for m, path in mods.items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("midijax"):
        for a in node.names:
          if f"{node.module}.{a.name}" in mods:
            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith("midijax") and a.asname:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and aliases[node.value.id] != m
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{m} uses {aliases[node.value.id]}.{node.attr} (line {node.lineno})")
  assert not bad, "\n".join(bad)


def test_encodings_import_no_jax():
  for path in (PACKAGE / "encoding").glob("*.py"):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for n in names:
        assert not n.split(".")[0] in ("jax", "flax", "optax", "tensorflow"), (path, n)


@pytest.mark.parametrize("argv, absent", [
    (["--help"], ("numpy", "jax", "tensorflow", "note_seq")),
    (["encodings"], ("jax", "tensorflow", "note_seq", "pretty_midi")),
    (["midi2tokens", "{mid}", "{tmp}/t.txt"], ("jax", "tensorflow", "note_seq")),
    (["tokens2midi", "{tmp}/t.txt", "{tmp}/t.mid"], ("jax", "tensorflow", "note_seq", "bokeh",
                                                     "pandas")),
])
def test_light_commands_import_no_heavy_modules(argv, absent, groove_files, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("light_commands")
  if argv[0] == "tokens2midi":  # its input, made here: no test relies on another's files
    from midijax import cli
    assert cli.main(["midi2tokens", str(groove_files[0]), str(tmp / "t.txt")]) == 0
  argv = [a.format(mid=groove_files[0], tmp=tmp) for a in argv]
  code = ("import json, sys\n"
          "from midijax import cli\n"
          "try:\n"
          f"  status = cli.main({argv!r})\n"
          "except SystemExit as e:\n"
          "  status = e.code\n"
          f"print(json.dumps([status, [m for m in {list(absent)!r} if m in sys.modules]]),"
          " file=sys.stderr)\n")
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=120)
  status, loaded = json.loads(proc.stderr.strip().splitlines()[-1])
  assert status == 0, proc.stderr
  assert loaded == [], f"{argv[0]} imported {loaded}"
