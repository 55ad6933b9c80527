"""Fixtures of the install tests: the built sdist and wheel (tests/install/dist.py), and fastlb as a user
runs it once installed: from a fresh virtualenv, in a directory outside the source tree, with nothing of
the tree on its path."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import dist  # noqa: E402
from procs import REPO, Processes  # noqa: E402


@pytest.fixture(scope="session")
def built() -> dist.Dist:
    return dist.build()


@dataclass
class Installed:
    kind: str                       # installed from the "wheel" or the "sdist"
    venv: Path
    cwd: Path                       # outside the source tree
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def fastlb(self) -> str:
        return str(self.venv / "bin" / "fastlb")

    def start(self, procs: Processes, *args: str, name: str = "fastlb"):
        """The installed `fastlb ARGS` as a process of the test."""
        return procs.start([self.fastlb, *args], name, env=self.env, cwd=self.cwd)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session", params=dist.KINDS)
def installed(request, built, tmp_path_factory) -> Installed:
    venv = built.venv(request.param)
    cwd = tmp_path_factory.mktemp(f"outside-{request.param}")
    assert REPO not in cwd.parents, f"{cwd} is inside the source tree"
    env = dist.user_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return Installed(request.param, venv, cwd, env)


def pytest_collection_modifyitems(items):
    """What the packages hold first, the container last: a broken package shows in the quickest test,
    and the image takes longest."""
    order = {"test_packages.py": 0, "test_container.py": 2}
    items.sort(key=lambda item: order.get(item.path.name, 1))
