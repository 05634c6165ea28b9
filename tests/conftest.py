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


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Bad input ends the way a user can act on: exit code 1 or 2, no traceback, and exactly one stderr
    line starting with 'error:' that names every needle (the flag or file at fault). Returns that line."""
    assert result.returncode in (1, 2), (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(*dirs: Path) -> dict[Path, float]:
    """Every file under dirs with its modification time: compare two snapshots to see what a run wrote."""
    return {p: p.stat().st_mtime for d in dirs if d.exists() for p in d.rglob("*") if p.is_file()}


def read_scalars(run_dir: Path, skip=("SPS", "sps", "time", "wall")) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars a run logged, {tag: [(step, value), ...]}, timing tags left out: two runs
    with the same seed must agree on all of these."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not any(s in tag for s in skip)
    }
