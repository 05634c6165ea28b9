"""Shared fixtures: the repo root on sys.path (tests import the scripts) and offline-made demos."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Two cores are shared by the test process and the simulators it spawns.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python script args...` from the repo root the way a user would, and returns the result."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def pickcube_demos(tmp_path_factory) -> Path:
    """10 motion-planned PickCube-v1 demos (state obs, pd_ee_delta_pos), made by make_demos.sh."""
    out = tmp_path_factory.mktemp("demos")
    result = subprocess.run(
        ["bash", str(ROOT / "make_demos.sh"), "PickCube-v1", "10", "pd_ee_delta_pos", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.exists(), path
    return path
