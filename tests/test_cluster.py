"""What users of shared clusters meet (issue 39): symlinked image folders, two runs in one output
folder, a full disk, an output folder that cannot be written, a stray torchrun environment, and
messages that say what is wrong once."""
import argparse
import errno
import os

import pytest
import torch
from PIL import Image

import common


def _args(data, root, **kw):
    return argparse.Namespace(data=data, data_root=str(root), synthetic_len=4, synthetic_size=0, synthetic_style="colour",
                              image_size=32, seed=0, **kw)


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40 % 255, 10, 20)).save(folder / f"img{i}.jpg")


# ---- 1. symlinked folders ----------------------------------------------------------------------
def test_images_below_symlinked_folders_are_found_once_and_counted(tmp_path, capsys):
    _write_images(tmp_path / "data" / "real", 6)
    _write_images(tmp_path / "other", 16)
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "other")
    (tmp_path / "data" / "loop").symlink_to(".")  # `ln -s . loop`: must end, and add nothing
    (tmp_path / "data" / "twice").symlink_to(tmp_path / "other")  # the same folder again: counted once
    files = common.find_images(tmp_path / "data")
    assert len(files) == 22 and len({os.path.realpath(f) for f in files}) == 22
    assert len(common.build_pretrain_dataset(_args(str(tmp_path / "data"), tmp_path), None)) == 22
    assert "22 images (linked/: 16, real/: 6)" in capsys.readouterr().out
