"""Mutation check: plants small, plausible bugs one at a time in a temporary copy of the repo and runs
the tests that should catch each. A planted bug that no test catches (it "survives") means the suite
cannot keep the math right, so the script exits non-zero if any survives.

    python bench/mutants.py                    # every mutant (a few minutes on 2 cores)
    python bench/mutants.py --script sac_flow  # one script's mutants
    python bench/mutants.py --list             # what would be planted

Each mutant replaces one exact snippet (it must occur exactly once in the file) and names the tests to run.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    script: str  # file name without .py
    name: str  # the bug, in words
    old: str  # exact snippet in the script
    new: str  # what replaces it
    tests: str  # pytest -k expression within tests/test_<script>.py ("" = the whole file)


MUTANTS: list[Mutant] = [
]


def run(m: Mutant, tmp: Path) -> tuple[bool, float]:
    """Plants m in tmp (a copy of the repo), runs its tests; returns (killed, seconds)."""
    path = tmp / f"{m.script}.py"
    original = (ROOT / f"{m.script}.py").read_text()
    if (n := original.count(m.old)) != 1:
        raise SystemExit(f"error: mutant {m.name!r}: its snippet occurs {n} times in {path.name}, not once")
    path.write_text(original.replace(m.old, m.new))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"tests/test_{m.script}.py"]
    if m.tests:
        cmd += ["-k", m.tests]
    t0 = time.time()
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    path.write_text(original)
    if result.returncode not in (0, 1):  # collection error, no test selected...: not a verdict on the mutant
        raise SystemExit(f"error: {m.name!r}: pytest exit {result.returncode}\n{result.stdout[-999:]}")
    return result.returncode == 1, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", help="only this script's mutants (e.g. sac_flow)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args()
    todo = [m for m in MUTANTS if a.script in (None, m.script)]
    if not todo:
        raise SystemExit(f"error: no mutants for --script {a.script!r}")
    if a.list:
        for m in todo:
            print(f"{m.script:15s} {m.name}")
        return
    survived = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for f in ROOT.glob("*.py"):
            shutil.copy(f, tmp)
        shutil.copytree(ROOT / "tests", tmp / "tests")
        for f in ("make_demos.sh", "pyproject.toml"):
            shutil.copy(ROOT / f, tmp)
        t0 = time.time()
        for m in todo:
            killed, sec = run(m, tmp)
            print(f"{'killed  ' if killed else 'SURVIVED'} {sec:6.1f}s  {m.script:15s} {m.name}", flush=True)
            if not killed:
                survived.append(m)
    print(f"{len(todo) - len(survived)} of {len(todo)} mutants killed, {len(survived)} survived "
          f"({(time.time() - t0) / 60:.1f} min)")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
