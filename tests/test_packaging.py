"""The package: pinned requirement sets, extras, platform markers, and what pip resolves.

Offline checks: pyproject.toml reads its dependencies and the extras tpu, cuda12, beam and
test from requirements*.txt; every line is an exact pin; the accelerator extras follow the
jax pin (and the test extra's libtpu the one jax[tpu] pins); the TensorFlow markers pick
tensorflow-cpu on x86_64 Linux and tensorflow elsewhere; what is installed here matches
the pins and `pip check` finds nothing broken.

Checks that ask the package index (`pip install --dry-run`, marked `index`; they skip when
the index cannot be reached, and fail under CI=true): the extras resolve beside the pins,
and on Linux aarch64 and macOS arm64 the runtime set, with the tensorflow its marker picks
there, has wheels for Python 3.11 (tensorflow-cpu has none, which is why the marker exists).
"""
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from conftest import IN_CI

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = ("tpu", "cuda12", "beam", "test")
PLATFORMS = {
    # name: (marker environment, pip --platform tags, newest first)
    "linux_x86_64": ({"sys_platform": "linux", "platform_machine": "x86_64",
                      "platform_system": "Linux"}, ()),
    "linux_aarch64": ({"sys_platform": "linux", "platform_machine": "aarch64",
                       "platform_system": "Linux"},
                      ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                       "manylinux_2_17_aarch64", "manylinux2014_aarch64")),
    "macos_arm64": ({"sys_platform": "darwin", "platform_machine": "arm64",
                     "platform_system": "Darwin"},
                    ("macosx_14_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64")),
}


def _requirements(path: pathlib.Path):
  """The requirements of a pinned file (comments and blank lines skipped)."""
  lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
  return [Requirement(line) for line in lines if line]


def _sets():
  """{"runtime" or extra: [Requirement]} as pyproject.toml declares them."""
  dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]
  sets = {"runtime": [r for f in dynamic["dependencies"]["file"]
                      for r in _requirements(REPO / f)]}
  for extra, spec in dynamic["optional-dependencies"].items():
    sets[extra] = [r for f in spec["file"] for r in _requirements(REPO / f)]
  return sets


def _applies(req: Requirement, platform_env) -> bool:
  env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
         **platform_env, "extra": ""}
  return req.marker is None or req.marker.evaluate(env)


def _pin(req: Requirement) -> str:
  (spec,) = req.specifier
  assert spec.operator == "==", req
  return spec.version


JAX_PIN = next(_pin(r) for r in _sets()["runtime"] if r.name == "jax")


# --------------------------------------------------------------------------- offline
def test_pyproject_reads_the_pinned_requirement_files():
  project = PYPROJECT["project"]
  assert project["requires-python"] == ">=3.11"
  assert set(project["dynamic"]) == {"dependencies", "optional-dependencies"}
  assert "dependencies" not in project and "optional-dependencies" not in project
  sets = _sets()
  assert set(sets) == {"runtime", *EXTRAS}
  for name, reqs in sets.items():
    assert reqs, name
    for req in reqs:
      _pin(req)  # Exact pins only: the sets were resolved and tested together.
  names = [canonicalize_name(r.name) for r in sets["runtime"]]
  for must in ("tensorflow-datasets", "protobuf", "jax", "etils", "scikit-learn", "scipy"):
    assert must in names
  assert {canonicalize_name(r.name) for r in sets["test"]} >= {"pytest", "libtpu"}
  assert {r.name for r in sets["beam"]} == {"apache-beam", "mlcroissant"}
  # Runtime stays lean: no test tooling on a TPU worker.
  assert not set(names) & {"pytest", "selenium", "trio"}


def test_accelerator_extras_follow_the_jax_pin():
  sets = _sets()
  assert [str(r) for r in sets["tpu"]] == [f"jax[tpu]=={JAX_PIN}"]
  assert [str(r) for r in sets["cuda12"]] == [f"jax[cuda12]=={JAX_PIN}"]
  # The test extra's libtpu is the one jax[tpu] at the pin asks for.
  (libtpu,) = [r for r in sets["test"] if r.name == "libtpu"]
  if importlib.metadata.version("jax") != JAX_PIN:
    pytest.skip(f"installed jax is not the pinned {JAX_PIN}")
  wanted = [Requirement(r) for r in importlib.metadata.requires("jax")
            if r.startswith("libtpu") and 'extra == "tpu"' in r]
  assert [str(r.specifier) for r in wanted] == [str(libtpu.specifier)]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_tensorflow_markers_pick_one_tensorflow_per_platform(platform):
  env, _ = PLATFORMS[platform]
  runtime = [r for r in _sets()["runtime"] if _applies(r, env)]
  tensorflows = [r.name for r in runtime if r.name in ("tensorflow", "tensorflow-cpu")]
  assert tensorflows == (["tensorflow-cpu"] if platform == "linux_x86_64" else ["tensorflow"])
  # Both builds at the same version.
  assert len({_pin(r) for r in _sets()["runtime"]
              if r.name in ("tensorflow", "tensorflow-cpu")}) == 1
  libtpu = [r for r in _sets()["test"] if r.name == "libtpu" and _applies(r, env)]
  assert bool(libtpu) == (platform == "linux_x86_64")  # libtpu: x86_64 Linux wheels only.


def test_installed_packages_match_the_pins():
  """Everything pinned for this platform that is installed has its pinned version (all of
  it under CI, where launch/setup.sh installed the runtime set and the beam and test extras)."""
  missing, wrong = [], []
  for extra in ("runtime", "beam", "test"):
    for req in _sets()[extra]:
      if not _applies(req, {}):
        continue
      try:
        version = importlib.metadata.version(req.name)
      except importlib.metadata.PackageNotFoundError:
        missing.append(str(req))
        continue
      if not req.specifier.contains(version, prereleases=True):
        wrong.append(f"{req} (installed {version})")
  assert wrong == []
  if IN_CI:
    assert missing == []


def test_pip_check_finds_no_broken_requirements():
  proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- package index
# pip's words when it cannot reach the index (then the check skips outside CI).
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|"
                      r"Temporary failure in name resolution|Name or service not known|"
                      r"Network is unreachable|ConnectTimeoutError|ProxyError|"
                      r"Max retries exceeded|Could not fetch URL")


def _dry_run(args, report: pathlib.Path, timeout=600):
  """`pip install --dry-run --report REPORT ARGS`; returns the installed names -> versions.

  fast-deps reads each wheel's metadata with HTTP range requests instead of downloading
  whole wheels (the CUDA wheels are gigabytes).
  """
  cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--retries", "1",
         "--timeout", "30", "--use-feature=fast-deps", "--report", str(report), *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
  out = proc.stdout + proc.stderr
  if proc.returncode != 0 and _OFFLINE.search(out):
    if IN_CI:
      pytest.fail(f"CI=true but the package index is unreachable:\n{out[-2000:]}")
    pytest.skip("the package index is unreachable")
  assert proc.returncode == 0, out[-4000:]
  return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
          for item in json.loads(report.read_text())["install"]}


def _installed_or_resolved(name: str, resolved) -> str:
  name = canonicalize_name(name)
  if name in resolved:
    return resolved[name]
  return importlib.metadata.version(name)


@pytest.mark.index
def test_extras_resolve_beside_the_pins(tmp_path):
  """pip resolves the runtime set with all four extras at once, next to what is installed."""
  resolved = _dry_run([".[beam,test,tpu,cuda12]"], tmp_path / "report.json")
  assert _installed_or_resolved("jax", resolved) == JAX_PIN
  assert _installed_or_resolved("jax-cuda12-plugin", resolved) == JAX_PIN
  assert _installed_or_resolved("libtpu", resolved).startswith("0.0.42.")
  assert _installed_or_resolved("apache-beam", resolved) == "2.77.0"
  assert _installed_or_resolved("protobuf", resolved).startswith("6.33.")


@pytest.mark.index
@pytest.mark.parametrize("platform", ["linux_aarch64", "macos_arm64"])
def test_runtime_set_has_wheels_for_other_platforms(platform, tmp_path):
  """pip's --platform resolution evaluates markers for this machine, not the target, so
  the markers are evaluated here (test above) and the resulting pins checked for wheels."""
  env, tags = PLATFORMS[platform]
  pins = [r for r in _sets()["runtime"] if _applies(r, env)]
  for req in pins:
    req.marker = None
  reqs = tmp_path / "requirements.txt"
  reqs.write_text("".join(f"{r}\n" for r in pins))
  target = ["--no-deps", "--ignore-installed", "--only-binary=:all:", "--python-version",
            "3.11", "--implementation", "cp", "--target", str(tmp_path / "target"),
            *[f"--platform={t}" for t in tags]]
  resolved = _dry_run([*target, "-r", str(reqs)], tmp_path / "report.json")
  assert resolved["tensorflow"] == "2.21.0" and resolved["jaxlib"] == JAX_PIN
  assert set(resolved) == {canonicalize_name(r.name) for r in pins}
  # The reason for the marker: tensorflow-cpu 2.21.0 has no wheel there.
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                         "--retries", "1", "--timeout", "30", *target,
                         "tensorflow-cpu==2.21.0"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0 and "No matching distribution" in proc.stderr, proc.stderr
