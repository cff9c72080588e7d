"""Each method file, copied alone with its plumbing (common.py, imagedata.py, backbones.py) into an empty folder, still
runs (users copy them)."""
import shutil

import pytest

import common
from conftest import REPO, TINY, python

PLUMBING = ("common.py", "imagedata.py", "backbones.py")

CASES = {
    "moco.py": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "densecl.py": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "decon.py": [*TINY, "--dim-hidden", "64"],
    "decon_densecl.py": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "mcl.py": ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--synthetic-len", "32", "--workers", "0"],
    "adclr.py": ["--arch", "vit_micro", "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--num-queries",
                 "4", "--out-dim", "128", "--synthetic-len", "32", "--batch-size", "8", "--workers", "0"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_method_file_and_its_plumbing_alone_in_an_empty_folder(tmp_path, script):
    for f in (script, *PLUMBING):
        shutil.copy(REPO / f, tmp_path / f)
    python(script, *CASES[script], "--max-steps", "1", "--output-dir", "out", cwd=tmp_path, env={"PYTHONPATH": ""})
    assert common.load_checkpoint(tmp_path / "out" / "checkpoint.pth")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == sorted([script, *PLUMBING])
