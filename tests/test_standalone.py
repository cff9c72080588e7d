"""Each method file, copied with common.py alone into an empty folder, is the whole method: --help
works and a tiny run trains (users copy these two files). The run takes --gpu-augment, the path that
reads the most of common.py (decoding, then the device pipelines); the CPU pipelines run in every
other test, and tests/test_amp.py runs --gpu-augment for every method in the repository too."""
import shutil

import pytest

import common
from conftest import REPO, TINY, python

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
def test_method_file_and_common_alone_in_an_empty_folder(tmp_path, script):
    for f in (script, "common.py"):
        shutil.copy(REPO / f, tmp_path / f)
    env = {"PYTHONPATH": ""}  # nothing of the repository but the two files
    assert "--gpu-augment" in python(script, "--help", cwd=tmp_path, env=env)
    python(script, *CASES[script], "--gpu-augment", "--max-steps", "1", "--output-dir", "out", cwd=tmp_path, env=env)
    ckpt = common.load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["step"] == 1 and ckpt["args"]["gpu_augment"] is True
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == sorted([script, "common.py"])
