"""The README's quick start, run exactly as written in a fresh folder, prints the numbers the README
and docs/downstream.md state: a number left stale by a code change turns CI red (#42).

The commands are read from the README's "Quick start" code block and run one after another in a
copy of the repository's files (as a new user's clone would run them), the comments stripped. The
runs are deterministic on a CPU at a fixed thread count, but not across counts: the block's first
line, `export OMP_NUM_THREADS=1`, pins one, and the test applies the exports as a shell would."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TOLERANCE = 0.005  # percentage points: at a fixed thread count the runs repeat exactly; this is the printing


def quick_start():
    """The commands of the README's quick start, and the section's text."""
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()], section


def stated(pattern, text, what):
    match = re.search(pattern, text, re.S)
    assert match, f"the README no longer states {what} ({pattern!r})"
    return float(match.group(1))


@pytest.mark.slow
def test_the_quick_start_prints_what_the_readme_says(tmp_path):
    lines, section = quick_start()
    exports = dict(line.split()[1].split("=", 1) for line in lines if line.startswith("export "))
    commands = [line for line in lines if not line.startswith("export ")]
    assert exports == {"OMP_NUM_THREADS": "1"}  # what makes the numbers repeat
    assert [c.split()[1] for c in commands] == ["moco.py", "eval_dense.py", "eval_dense.py", "eval_dense.py"]
    for item in [*REPO.glob("*.py"), REPO / "evaluation"]:  # a fresh folder: no runs/ of earlier tests
        (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp_path / item.name)
    printed = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(exports)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        printed.append(proc.stdout)
    got = {"probe": stated(r"\nmIoU (\d+\.\d+)", printed[1], "the probe's mIoU"),
           "floor": stated(r"\nmIoU (\d+\.\d+)", printed[2], "the floor's mIoU"),
           "knn": stated(r"top-1 (\d+\.\d+)", printed[3], "the k-NN top-1")}
    said = {"probe": stated(r"prints mIoU (\d+\.\d+) for this run", section, "the probe's mIoU"),
            "floor": stated(r"and (\d+\.\d+) for the random network", section, "the floor's mIoU"),
            "knn": stated(r"k-NN[^.]*?top-1 (\d+\.\d+)%", section, "the k-NN top-1")}
    downstream = (REPO / "docs" / "downstream.md").read_text()
    said_docs = stated(r"quick start's MoCo run.*?top-1 (\d+\.\d+)%", downstream, "the k-NN top-1 in docs/downstream.md")
    assert got == pytest.approx(said, abs=TOLERANCE), f"printed {got}, the README says {said}"
    assert got["knn"] == pytest.approx(said_docs, abs=TOLERANCE)
