"""Shared helpers: run a repository script in a subprocess, as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first: pytest-xdist hands tests out in collection order, so a long one
    collected late would run alone at the end and set the suite's time on 2 cores."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: the rest keep their order
sys.path.insert(0, str(REPO))

# Small settings that make any pre-training script take a few seconds on a CPU.
TINY = ["--arch", "resnet18", "--image-size", "32", "--synthetic-len", "32", "--batch-size", "8",
        "--workers", "0", "--log-every", "1"]


def run(cmd, cwd=REPO, timeout=600, env=None):
    """Run `cmd` (a list) and return its stdout; fail the test with the output if it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def python(*args, **kw):
    return run([sys.executable, *map(str, args)], **kw)


def torchrun(nproc, *args, **kw):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *map(str, args)], **kw)


RANK_DUMP = '''
import os, sys, torch
sys.path.insert(0, {repo!r})
import {module} as m
models = m.main(sys.argv[1:])
torch.save([x.state_dict() for x in models], os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
'''


def rank_dump_script(tmp_path, module):
    """A script that runs `module`.main and saves every rank's returned modules' state dicts."""
    path = tmp_path / f"dump_{module}.py"
    path.write_text(RANK_DUMP.format(repo=str(REPO), module=module, out=str(tmp_path)))
    return path


def assert_ranks_equal(tmp_path, min_compared=10):
    """The state dicts both ranks saved are equal, BN running statistics aside (per-rank by design:
    DDP re-broadcasts them each forward, and CPU runs have no SyncBN). Returns rank 0's."""
    import torch
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    compared = 0
    for a, b in zip(r0, r1):
        for name in a:
            if "running_" in name or "num_batches" in name:
                continue
            assert torch.equal(a[name], b[name]), name
            compared += 1
    assert compared >= min_compared
    return r0
