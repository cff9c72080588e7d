"""Bad input stops with one line that names the problem and the fix: a SystemExit with a message (no
traceback), a non-zero status, and nothing left behind (no output folder, no args.json)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

import common
import eval_dense
from conftest import REPO, TINY

METHODS = ["moco", "densecl", "decon", "decon_densecl", "mcl", "adclr"]
SMALL = {  # each file's tiny flags, a global batch of 8 (MCL: 32)
    "moco": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "densecl": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "decon": [*TINY, "--dim-hidden", "64"],
    "decon_densecl": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "mcl": ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--workers", "0"],
    "adclr": ["--arch", "vit_micro", "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--num-queries",
              "4", "--out-dim", "128", "--batch-size", "8", "--workers", "0"],
}


def stops(main, argv, out, says):
    """main(argv) ends in a SystemExit whose message contains `says`, and `out` was never created."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert isinstance(stop.value.code, str) and says in stop.value.code, stop.value.code
    assert not out.exists()


def folders(tmp_path):
    empty, text, junk = tmp_path / "empty", tmp_path / "text", tmp_path / "junk"
    for f in (empty, text, junk):
        f.mkdir()
    (text / "notes.txt").write_text("no image here")
    for i in range(12):
        (junk / f"{i:02d}.jpg").write_bytes(b"not a jpeg at all")
    return {"missing": (tmp_path / "nowhere", "does not exist"), "empty": (empty, "no images"),
            "text": (text, "no images"), "unreadable": (junk, "none of the 12 image files")}


@pytest.mark.parametrize("method", METHODS)
def test_bad_data_folders_stop_with_one_line_and_leave_nothing(tmp_path, method):
    module = __import__(method)
    for name, (folder, says) in folders(tmp_path).items():
        out = tmp_path / f"out-{name}"
        stops(module.main, [*SMALL[method], "--data", folder, "--max-steps", "1", "--output-dir", out], out, says)


def test_fewer_images_than_one_batch_stops_with_one_line(tmp_path):
    import moco
    (tmp_path / "two").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 90, 0, 0)).save(tmp_path / "two" / f"{i}.jpg")
    out = tmp_path / "out"
    stops(moco.main, [*SMALL["moco"], "--data", tmp_path / "two", "--output-dir", out], out,
          "2 images are fewer than one global batch of 8")


def test_a_refused_start_keeps_the_existing_script_copy(tmp_path):
    """A start that is refused (here: other arguments) leaves the run's copy of the script as it was."""
    import moco
    out = tmp_path / "run"
    moco.main([*SMALL["moco"], "--synthetic-len", "8", "--max-steps", "1", "--output-dir", str(out)])
    (out / "moco.py").write_text("# the copy of the run's own version")
    with pytest.raises(SystemExit):
        moco.main([*SMALL["moco"], "--synthetic-len", "8", "--queue-size", "128", "--output-dir", str(out)])
    assert (out / "moco.py").read_text() == "# the copy of the run's own version"


@pytest.mark.parametrize("script,flag", [("moco", "--lr"), ("decon", "--lr"), ("adclr", "--teacher-temp"),
                                         ("mcl", "--min-lr"), ("eval_dense", "--lr"), ("densecl", "--temperature")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_flags_are_refused_at_parse_time(script, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        __import__(script).get_args([f"{flag}={value}"])
    assert stop.value.code == 2 and "must be a finite number" in capsys.readouterr().err


def test_resnet_weights_with_a_vit_arch_are_one_line(tmp_path):
    """A ResNet's weights given with --arch vit_*: the file's architecture named, for the segmentation,
    classification and export paths (each reads the ViT's geometry off the file first)."""
    common.save_downstream(tmp_path / "r18.pth", "moco", "resnet18", common.ResNetTrunk("resnet18"))
    small = ["--synthetic-train", "8", "--synthetic-val", "4", "--synthetic-size", "32", "--crop-size", "32",
             "--batch-size", "4", "--workers", "0"]
    for extra in (["--task", "probe"], ["--task", "knn"], ["--export", "timm", tmp_path / "t.pth"]):
        out = tmp_path / "ev"
        stops(eval_dense.main, ["--init", tmp_path / "r18.pth", "--arch", "vit_small", *small, *extra,
                                "--output-dir", out], out, "does not fit a vit_small (the file's architecture: resnet18")
    assert not (tmp_path / "t.pth").exists()


@pytest.mark.parametrize("script", [*METHODS, "eval_dense"])
def test_an_unknown_arch_is_refused_at_parse_time(script, capsys):
    with pytest.raises(SystemExit) as stop:
        __import__(script).get_args(["--arch", "resnet5"])
    assert stop.value.code == 2 and "--arch: invalid choice: 'resnet5'" in capsys.readouterr().err


def test_eval_init_missing_or_without_downstream_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # a run folder that has not finished: no downstream.pth
    for init in (tmp_path / "nothing.pth", run):
        out = tmp_path / "ev"
        stops(eval_dense.main, ["--init", init, "--output-dir", out], out, "does not exist. Give a run folder")
    proc = subprocess.run([sys.executable, "eval_dense.py", "--init", str(run)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "downstream.pth does not exist" in proc.stderr


def test_eval_init_that_is_not_a_checkpoint(tmp_path):
    """--init naming random bytes or a pickled object (not tensors) is one line naming the file, for
    every task (the export and the detection tasks read it through the same function)."""
    import torch
    junk, pickled = tmp_path / "junk.pth", tmp_path / "pickled.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: refused by weights_only=True
    for init, why in ((junk, "its bytes do not read as a PyTorch checkpoint"),
                      (pickled, "it holds objects other than tensors")):
        for task in ("probe", "knn", "detect"):
            out = tmp_path / f"ev-{task}"
            stops(eval_dense.main, ["--init", init, "--task", task, "--output-dir", out], out,
                  f"--init {init}: cannot be read as a checkpoint ({why}")
    proc = subprocess.run([sys.executable, "eval_dense.py", "--init", str(junk)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot be read as a checkpoint" in proc.stderr


@pytest.mark.parametrize("data,says", [("voc", "--data voc: "), ("cityscapes", "--data cityscapes: "),
                                       ("ade20k", "--data ade20k: "), ("voc-empty", "no image/label pairs")])
def test_missing_segmentation_data_is_one_line(tmp_path, data, says):
    root = tmp_path / "data"
    if data == "voc-empty":  # the layout is there, the lists name no image
        base = root / "VOCdevkit" / "VOC2012"
        (base / "ImageSets" / "Segmentation").mkdir(parents=True)
        (base / "SegmentationClass").mkdir()
        for split in ("train", "val"):
            (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("")
        data = "voc"
    root.mkdir(exist_ok=True)
    for task in ("probe", "finetune"):
        out = tmp_path / f"ev-{task}"
        stops(eval_dense.main, ["--task", task, "--data", data, "--data-root", root, "--output-dir", out], out, says)


def test_vit_finetune_takes_the_pyramid_head_and_refuses_fcn(tmp_path):
    flags = ["--arch", "vit_micro", "--patch-size", "8", "--task", "finetune", "--synthetic-size", "32", "--crop-size",
             "32", "--synthetic-train", "4", "--synthetic-val", "2", "--iters", "1", "--batch-size", "2", "--workers", "0"]
    eval_dense.main([*flags, "--output-dir", str(tmp_path / "ev")])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["head"] == "fpn"
    stops(eval_dense.main, [*flags, "--head", "fcn", "--output-dir", tmp_path / "ev2"], tmp_path / "ev2",
          "takes --head fpn")


def test_a_new_evaluation_for_new_weights_under_the_same_path(tmp_path, monkeypatch):
    """Evaluate a run, train it further in place (new downstream.pth), evaluate again with the same
    flags: a new folder and the new weights' number, never the old evaluation resumed; with the old
    folder given explicitly, a refusal."""
    import torch
    monkeypatch.chdir(tmp_path)  # the default folders go below runs/eval here
    flags = ["--init", "run", "--arch", "resnet18", "--task", "finetune", "--head", "linear", "--synthetic-train", "8",
             "--synthetic-val", "4", "--synthetic-size", "32", "--crop-size", "32", "--iters", "2", "--batch-size", "2",
             "--workers", "0"]
    (tmp_path / "run").mkdir()
    torch.manual_seed(0)
    common.save_downstream(tmp_path / "run" / "downstream.pth", "moco", "resnet18", common.ResNetTrunk("resnet18"))
    first = eval_dense.main(flags)
    torch.manual_seed(1)  # "trained further": other weights in the same file
    common.save_downstream(tmp_path / "run" / "downstream.pth", "moco", "resnet18", common.ResNetTrunk("resnet18"))
    second = eval_dense.main(flags)
    evals = sorted((tmp_path / "runs" / "eval").iterdir())
    assert len(evals) == 2  # the same flags, other weights: another folder
    fresh = eval_dense.main([*flags, "--output-dir", str(tmp_path / "fresh")])
    assert second["mIoU"] == fresh["mIoU"] and second["pixel_accuracy"] == fresh["pixel_accuracy"]  # the new weights'
    assert (first["mIoU"], first["pixel_accuracy"]) != (second["mIoU"], second["pixel_accuracy"])
    old = next(e for e in evals if json.loads((e / "args.json").read_text())["init_sha"] != eval_dense.weights.init_digest("run"))
    with pytest.raises(SystemExit, match="holds an evaluation of other weights"):
        eval_dense.main([*flags, "--output-dir", str(old)])
