"""What users install, built as a release would be: the sdist (`python -m build --sdist`), the wheel pip
builds from it, a wheelhouse with every dependency and build requirement, and fresh virtualenvs with
the wheel or the sdist installed offline from that wheelhouse. The container image (docker/) builds
from the same wheelhouse.

Compiling the extensions takes minutes, so everything is cached under $FASTLB_CACHE (default
~/.cache/fastlb), keyed by the sdist's content and the interpreter: the same source is built once,
a changed file (or a module missing from the sdist) gives a new key and a new build. Only the newest
few builds are kept.

`python tests/install/dist.py` builds (or finds) them and prints the build's directory;
`python tests/install/dist.py --wheelhouse-for 3.11.2 DIR` also fills DIR with the dependency wheels and
build requirements a Python 3.11.2 installs fastlb from (the container image's Debian Python; docker/).
"""
from __future__ import annotations

import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FASTLB_CACHE", Path.home() / ".cache" / "fastlb"))
BUILDS_KEPT = 3
COMPLETE = "complete"                 # written last: a build interrupted halfway is redone
KINDS = ("wheel", "sdist")            # what a virtualenv gets installed from


@dataclass
class Dist:
    directory: Path
    sdist: Path
    wheel: Path
    wheelhouse: Path                  # the wheel, its dependencies and the sdist's build requirements

    def venv(self, kind: str) -> Path:
        """A virtualenv with fastlb installed from the wheel or the sdist (compiled then), offline."""
        return _installed_venv(self, kind)


def run(args: list, cwd: Path | None = None) -> None:
    """Runs a build step; its output is shown only when it fails."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            env=user_env())
    if result.returncode:
        raise RuntimeError(f"`{' '.join(map(str, args))}` failed ({result.returncode}):\n"
                           f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")


def user_env() -> dict[str, str]:
    """The environment without the source tree on the path or a test knob: what a user's shell has."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("FASTLB_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def content_key(sdist: Path) -> str:
    """The sdist's file names and contents (not its timestamps) and the interpreter building from it."""
    digest = hashlib.sha256(f"{sys.version}\n{sys.platform}\n".encode())
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            digest.update(member.name.encode() + b"\0")
            if member.isfile():
                digest.update(tar.extractfile(member).read())
    return digest.hexdigest()[:16]


def _sdist_metadata(sdist: Path) -> tuple[list[str], list[str]]:
    """(build requirements, runtime requirements) as the sdist declares them."""
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        pyproject = tomllib.loads(tar.extractfile(f"{root}/pyproject.toml").read().decode())
        pkg_info = email.parser.Parser().parsestr(tar.extractfile(f"{root}/PKG-INFO").read().decode())
    runtime = [r for r in pkg_info.get_all("Requires-Dist", []) if "extra ==" not in r]
    return pyproject["build-system"]["requires"], runtime


def build(cache: Path = CACHE) -> Dist:
    with tempfile.TemporaryDirectory(prefix="fastlb-sdist-") as scratch:
        run([sys.executable, "-m", "build", "--sdist", "--outdir", scratch, REPO])
        (fresh,) = Path(scratch).glob("fastlb-*.tar.gz")
        directory = cache / "dist" / content_key(fresh)
        if not (directory / COMPLETE).exists():
            shutil.rmtree(directory, ignore_errors=True)
            (directory / "wheelhouse").mkdir(parents=True)
            shutil.copy2(fresh, directory)
    sdist = directory / fresh.name
    wheelhouse = directory / "wheelhouse"
    if not (directory / COMPLETE).exists():
        build_requires, _ = _sdist_metadata(sdist)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--wheel-dir", wheelhouse]
        # The build requirements too: the sdist then installs, and the image builds, with no index.
        run([*pip_wheel, *build_requires])
        run([*pip_wheel, sdist])          # fastlb's wheel, built from the sdist, and its dependencies
        (directory / COMPLETE).touch()
    _prune(cache / "dist", keep=directory)
    (wheel,) = wheelhouse.glob("fastlb-*.whl")
    return Dist(directory, sdist, wheel, wheelhouse)


def _prune(builds: Path, keep: Path) -> None:
    others = sorted((d for d in builds.iterdir() if d != keep), key=lambda d: d.stat().st_mtime)
    keep.touch()
    for old in others[:max(0, len(others) - (BUILDS_KEPT - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _installed_venv(dist: Dist, kind: str) -> Path:
    assert kind in KINDS, kind
    venv = dist.directory / f"venv-{kind}"
    if (venv / COMPLETE).exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    # The interpreter the suite runs on, not its virtualenv: a fresh venv sees nothing of .venv's.
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv])
    target = dist.wheel if kind == "wheel" else dist.sdist
    with tempfile.TemporaryDirectory(prefix="fastlb-install-") as outside:
        run([venv / "bin" / "pip", "install", "--no-index", "--find-links", dist.wheelhouse, target],
            cwd=Path(outside))
    (venv / COMPLETE).touch()
    return venv


def wheelhouse_for(dist: Dist, python_full_version: str, dest: Path) -> None:
    """Copies the wheelhouse, less fastlb's own wheel, into dest, and downloads the wheels that another
    Python's environment markers add (redis needs async-timeout before 3.11.3): pip evaluates markers
    for the interpreter it runs on, whatever --python-version says."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    environment = default_environment() | {
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2])}
    wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in dist.wheelhouse.glob("*.whl")}
    missing, todo, seen = set(), [Requirement("fastlb")], set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        if name not in wheels:
            missing.add(str(requirement).split(";")[0])
            continue
        with zipfile.ZipFile(wheels[name]) as wheel:
            (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
            declared = email.parser.Parser().parsestr(wheel.read(metadata).decode())
        for line in declared.get_all("Requires-Dist", []):
            dependency = Requirement(line)
            if dependency.marker is None or any(dependency.marker.evaluate(environment | {"extra": extra})
                                                for extra in {"", *requirement.extras}):
                todo.append(dependency)
    dest.mkdir(parents=True, exist_ok=True)
    for name, wheel in wheels.items():
        if name != "fastlb":
            shutil.copy2(wheel, dest)
    if missing:
        run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version",
             python_full_version, "--dest", dest, *sorted(missing)])


if __name__ == "__main__":
    built_dist = build()
    if sys.argv[1:2] == ["--wheelhouse-for"]:
        wheelhouse_for(built_dist, sys.argv[2], Path(sys.argv[3]))
    print(built_dist.directory)
