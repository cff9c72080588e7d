"""eval_dense.py: metrics, dataset layouts, dilation, init loading, export, and whole runs."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import eval_dense as ev
from evaluation import probe, seg_data
from conftest import REPO, python


def test_miou_equals_naive_per_class_with_ignore_and_absent_classes():
    torch.manual_seed(0)
    C = 5
    label = torch.randint(0, 4, (2, 16, 16))  # class 4 never in the ground truth ...
    label[:, :3] = seg_data.IGNORE  # ... and some pixels ignored
    pred = torch.randint(0, 4, (2, 16, 16))  # ... nor predicted: it must not count in the mean
    pred[0, 5, 5] = 3
    m = ev.metrics_from_confusion(ev.confusion(pred, label, C), [str(i) for i in range(C)])
    ious = []
    for c in range(C):  # naive: pixel sets per class
        valid = label != seg_data.IGNORE
        tp = ((pred == c) & (label == c) & valid).sum().item()
        fp = ((pred == c) & (label != c) & valid).sum().item()
        fn = ((pred != c) & (label == c) & valid).sum().item()
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    assert m["per_class_IoU"]["4"] is None and len(ious) == 4
    assert m["mIoU"] == pytest.approx(100 * sum(ious) / len(ious))
    valid = label != seg_data.IGNORE
    assert m["pixel_accuracy"] == pytest.approx(100 * ((pred == label) & valid).sum().item() / valid.sum().item())


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def _voc_tree(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for i in ("a", "b"):
        _png(base / "JPEGImages" / f"{i}.jpg", np.full((20, 30, 3), 100))
        label = np.zeros((20, 30), np.uint8)
        label[5:10, 5:10], label[0] = 15, 255
        img = Image.fromarray(label, "P")
        img.putpalette([0] * 768)
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        img.save(base / "SegmentationClass" / f"{i}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")


def test_voc_layout(tmp_path):
    _voc_tree(tmp_path)
    pairs, n, lut = seg_data.seg_pairs("voc", tmp_path, "train")
    assert n == 21 and len(pairs) == 2 and lut is None
    x, y = seg_data.SegFiles(pairs, lut, seg_data.val_transform)[0]
    assert x.shape == (3, 20, 30) and y[7, 7] == 15 and y[0, 0] == 255 and y[15, 15] == 0


def test_cityscapes_ids_map_to_train_ids(tmp_path):
    img = tmp_path / "cityscapes" / "leftImg8bit" / "val" / "aachen" / "aachen_0_0_leftImg8bit.png"
    _png(img, np.zeros((8, 8, 3)))
    label = np.zeros((8, 8), np.uint8)
    label[0, 0], label[0, 1], label[0, 2], label[0, 3] = 7, 26, 33, 4  # road, car, bicycle, "static"
    _png(tmp_path / "cityscapes" / "gtFine" / "val" / "aachen" / "aachen_0_0_gtFine_labelIds.png", label)
    pairs, n, lut = seg_data.seg_pairs("cityscapes", tmp_path, "val")
    _, y = seg_data.SegFiles(pairs, lut, seg_data.val_transform)[0]
    assert n == 19 and y[0, :4].tolist() == [0, 13, 18, 255] and y[5, 5] == 255


def test_ade20k_zero_is_ignored(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _png(base / "images" / "validation" / "x.jpg", np.zeros((8, 8, 3)))
    label = np.zeros((8, 8), np.uint8)
    label[0, 0], label[0, 1] = 1, 150
    _png(base / "annotations" / "validation" / "x.png", label)
    pairs, n, lut = seg_data.seg_pairs("ade20k", tmp_path, "val")
    _, y = seg_data.SegFiles(pairs, lut, seg_data.val_transform)[0]
    assert n == 150 and y[0, 0] == 0 and y[0, 1] == 149 and y[3, 3] == 255


@pytest.mark.parametrize("data", ["voc", "cityscapes", "ade20k"])
def test_missing_layout_is_a_clear_error(tmp_path, data):
    with pytest.raises(SystemExit, match="Expected layout"):
        seg_data.seg_pairs(data, tmp_path, "train")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dilation_sets_output_stride_and_keeps_weights(arch):
    x = torch.randn(1, 3, 64, 64)
    plain = common.ResNetTrunk(arch, pyramid=True).eval()
    for stride, size in ((16, 4), (8, 8)):
        dilated = ev.dilate(common.ResNetTrunk(arch, pyramid=True), stride).eval()
        dilated.load_state_dict(plain.state_dict())  # same parameters, only strides/dilations change
        assert dilated(x)[3].shape[-1] == size
    assert torch.allclose(dilated(x)[0], plain(x)[0])  # C2 is untouched


def _downstream(tmp_path, arch="resnet50", decoder=False):
    trunk = common.ResNetTrunk(arch)
    fpn = common.FPN(trunk.channels) if decoder else None
    path = tmp_path / "downstream.pth"
    common.save_downstream(path, "test", arch, trunk, fpn, fpn.config if fpn else None)
    return path, trunk, fpn


def test_torchvision_export_loads_strictly(tmp_path):
    path, trunk, _ = _downstream(tmp_path)
    python("eval_dense.py", "--init", path, "--export", "torchvision", tmp_path / "tv.pth")
    net = torchvision.models.resnet50()
    net.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)
    assert torch.equal(net.layer3[2].conv2.weight, trunk.layer3[2].conv2.weight)


def test_detectron2_export_names_and_shapes(tmp_path):
    path, trunk, fpn = _downstream(tmp_path, decoder=True)
    python("eval_dense.py", "--init", path, "--export", "detectron2", tmp_path / "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        d2 = pickle.load(f)
    m = d2["model"]
    assert d2["matching_heuristics"] is True and all(isinstance(v, np.ndarray) for v in m.values())
    assert m["stem.conv1.weight"].shape == (64, 3, 7, 7) and "stem.conv1.norm.running_var" in m
    assert m["res2.0.shortcut.weight"].shape == (256, 64, 1, 1) and "res2.0.shortcut.norm.bias" in m
    assert m["res5.2.conv3.norm.weight"].shape == (2048,) and m["res4.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert m["fpn_lateral2.weight"].shape == (256, 256, 1, 1) and m["fpn_output5.norm.running_mean"].shape == (256,)
    assert not any("num_batches_tracked" in k or k.startswith("layer") or ".bn" in k for k in m)
    assert len([k for k in m if k.startswith(("stem", "res"))]) == len(
        [k for k in trunk.state_dict() if "num_batches" not in k])


def test_decoder_state_loads_into_fpn_head(tmp_path):
    _, _, fpn = _downstream(tmp_path, "resnet18", decoder=True)  # a DeCon-ML-style decoder: P2-P5 outputs
    model = ev.Segmenter("resnet18", "finetune", "fpn", 9, 32, fpn_levels=fpn.config["levels"])
    missing, unexpected = model.decoder.load_state_dict(fpn.state_dict(), strict=True)
    assert not missing and not unexpected
    logits, _, p2 = model(torch.randn(2, 3, 64, 64))
    assert p2.shape == (2, 256, 16, 16) and logits.shape == (2, 9, 16, 16)


TINY_EVAL = ["--arch", "resnet18", "--synthetic-size", "64", "--crop-size", "64", "--synthetic-train", "32",
             "--synthetic-val", "8", "--iters", "3", "--batch-size", "8", "--workers", "0"]


def test_probe_from_random_and_from_a_moco_run(tmp_path):
    python("moco.py", "--arch", "resnet18", "--image-size", "32", "--synthetic-len", "16", "--batch-size", "8", "--bn-splits", "2",
           "--workers", "0", "--queue-size", "64", "--max-steps", "1", "--output-dir", tmp_path / "moco")
    for init in ("random", tmp_path / "moco"):
        out = tmp_path / f"eval-{'random' if init == 'random' else 'moco'}"
        text = python("eval_dense.py", "--init", init, *TINY_EVAL, "--output-dir", out)
        m = json.loads((out / "metrics.json").read_text())
        assert 0 <= m["mIoU"] <= 100 and 0 < m["pixel_accuracy"] <= 100 and len(m["per_class_IoU"]) == 9
        assert m["method"] == ("random" if init == "random" else "moco") and "mIoU" in text
        assert Image.open(out / "predictions.png").size == (4 * 64, 4 * 64)


def test_finetune_fcn_runs_and_resumes(tmp_path):
    out = tmp_path / "ft"
    python("eval_dense.py", "--task", "finetune", "--init", "random", *TINY_EVAL, "--output-dir", out)
    assert common.load_checkpoint(out / "checkpoint.pth")["step"] == 3
    longer = ["eval_dense.py", "--task", "finetune", "--init", "random", *TINY_EVAL[:-6], "--iters", "5",
              "--batch-size", "8", "--workers", "0", "--output-dir", out]
    refused = subprocess.run([sys.executable, *map(str, longer)], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "--iters 3 in the checkpoint, 5 now" in refused.stderr
    assert json.loads((out / "args.json").read_text())["iters"] == 3  # the stored arguments are left as they were
    text = python(*longer, "--allow-arg-changes")
    assert "at step 3" in text and common.load_checkpoint(out / "checkpoint.pth")["step"] == 5


def test_init_decoder_without_decoder_is_a_clear_error(tmp_path):
    path, _, _ = _downstream(tmp_path, "resnet18")
    with pytest.raises(SystemExit, match="holds no pre-trained FPN decoder"):  # a message, no traceback
        ev.main(["--init", str(path), "--task", "finetune", "--head", "fpn", "--init-decoder", *TINY_EVAL,
                 "--output-dir", str(tmp_path / "x")])


def test_random_vit_probe_takes_the_patch_size(tmp_path):
    # A random ViT has no metadata: --patch-size must reach the model (bench.py quality probes ViTs at /8).
    python("eval_dense.py", "--init", "random", "--arch", "vit_micro", "--patch-size", "8", "--synthetic-size", "32",
           "--crop-size", "32", "--synthetic-train", "8", "--synthetic-val", "4", "--iters", "1", "--batch-size", "4",
           "--workers", "0", "--output-dir", tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["patch_size"] == 8


def test_cached_probe_and_linear_finetune_export(tmp_path):
    """The supervised ceiling's path: a linear head trained end to end, its backbone exported, then
    probed frozen on cached features; the cached probe leaves the backbone untouched."""
    common_flags = ["--arch", "resnet18", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-val", "4",
                    "--workers", "0", "--output-stride", "8"]
    python("eval_dense.py", "--task", "finetune", "--head", "linear", "--optimizer", "adamw", "--lr", "1e-3",
           "--scale-range", "1", "1", "--synthetic-train", "16", "--iters", "2", "--batch-size", "8", *common_flags,
           "--output-dir", tmp_path / "sup")
    down = common.load_checkpoint(tmp_path / "sup" / "downstream.pth")
    assert down["method"] == "supervised" and "layer4.1.conv2.weight" in down["backbone"]
    for layers in ("c5", "c345"):
        out = python("eval_dense.py", "--init", tmp_path / "sup", "--task", "probe", "--probe-cache", "--probe-epochs", "2",
                     "--probe-layers", layers, "--synthetic-train", "8", "--batch-size", "8", *common_flags,
                     "--output-dir", tmp_path / f"probe-{layers}")
        assert "| 2 epochs on cached features |" in out and "train: the scenes as generated, no augmentation" in out
        m = json.loads((tmp_path / f"probe-{layers}" / "metrics.json").read_text())
        assert m["probe_cache"] is True and m["probe_layers"] == layers and 0 <= m["mIoU"] <= 100
    model = ev.Segmenter("resnet18", "probe", "fcn", 9, 8, probe_layers="c345")
    assert model.head[1].in_channels == 128 + 256 + 512 and model.features(torch.randn(1, 3, 64, 64)).shape == (1, 896, 8, 8)


@pytest.mark.parametrize("size_in,size_out", [((8, 8), (64, 64)), ((9, 5), (37, 40)), ((12, 7), (7, 7)), ((4, 4), (4, 4))])
def test_cached_probe_upsampling_is_f_interpolate(size_in, size_out):
    # The cached probe upsamples its logits with two matmuls (faster backward on a CPU): the same
    # values and gradients as the bilinear F.interpolate the validation uses, up- and downsampling.
    x = torch.randn(3, 9, *size_in, dtype=torch.float64, requires_grad=True)
    rows, cols = (probe.bilinear_matrix(n, N, dtype=torch.float64) for n, N in zip(size_in, size_out))
    ours = torch.einsum("Hh,bchw,Ww->bcHW", rows, x, cols)
    ref = torch.nn.functional.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12)


# The papers' segmentation configs, transcribed from the files (mmsegmentation): SlotCon's README runs
# transfer/segmentation/configs/{voc12aug/fcn_d6_r50-d16_513x513_30k_voc12aug_moco.py,
# cityscapes/fcn_d6_r50-d16_769x769_90k_cityscapes_moco.py, ade20k/fcn_r50-d8_512x512_80k_ade20k.py};
# DenseCL's fork: configs/densecl/{fcn_r50-d8_512x512_20k_voc12aug.py, fcn_r50-d8_769x769_40k_cityscapes.py}.
D6 = dict(output_stride=16, fcn_head="d6", aux_weight=0.0, cat_max=1.0, photometric="off", align_corners="on",
          input_norm="moco-configs", min_lr=0.0)  # dilations (1,1,1,2), head dilation 6, no aux, moco dataset configs
D8 = dict(output_stride=8, fcn_head="d8", aux_weight=0.4, cat_max=0.75, photometric="on", min_lr=1e-4,
          input_norm="imagenet", steps=None)  # dilations (1,1,2,4), concat_input, aux 0.4, poly to 1e-4


@pytest.mark.parametrize("protocol,data,expected", [
    ("slotcon", "voc", dict(D6, crop_size=513, base_size=513, iters=30000, batch_size=16, lr=0.003, steps=[21000, 27000],
                            weight_decay=1e-4, val_resize=[513, 2049], slide=None)),
    ("slotcon", "cityscapes", dict(D6, crop_size=769, iters=90000, batch_size=16, lr=0.01, steps=[63000, 81000],
                                   weight_decay=1e-4, val_resize=None, slide=[769, 513])),
    ("slotcon", "ade20k", dict(D8, crop_size=512, iters=80000, batch_size=16, lr=0.01, weight_decay=5e-4,
                               val_resize=[512, 2048], slide=None, align_corners="off")),
    ("densecl", "voc", dict(D8, crop_size=512, iters=20000, batch_size=16, lr=0.01, weight_decay=5e-4,
                            val_resize=[512, 2048], slide=None, align_corners="off")),
    ("densecl", "cityscapes", dict(D8, crop_size=769, iters=40000, batch_size=8, lr=0.01, weight_decay=5e-4,
                                   val_resize=None, slide=[769, 513], align_corners="on")),
])
def test_finetune_defaults_are_the_papers_configs(protocol, data, expected):
    args = ev.get_args(["--task", "finetune", "--data", data, "--protocol", protocol])
    assert {k: getattr(args, k) for k in expected} == expected
    # a shorter run keeps the steps at the same fractions (70% and 90% in SlotCon's schedules)
    short = ev.get_args(["--task", "finetune", "--data", data, "--protocol", protocol, "--iters", "100"])
    assert short.steps == ([70, 90] if expected["steps"] else None)


def test_probe_and_synthetic_defaults_and_overrides():
    args = ev.get_args(["--data", "voc"])  # the probe: the dataset's data protocol, its own training
    assert args.input_norm == "imagenet"  # a frozen network sees its pre-training's normalisation
    assert (args.crop_size, args.val_resize, args.lr, args.steps, args.weight_decay, args.iters) == (513, [513, 2049], 0.01, None, 0.0, 2000)
    args = ev.get_args(["--task", "finetune"])  # synthetic scenes: this project's short schedule, as before
    assert (args.crop_size, args.iters, args.lr, args.min_lr, args.weight_decay, args.output_stride, args.fcn_head,
            args.align_corners, args.input_norm) == (224, 2000, 0.01, 0.0, 5e-4, 16, "d8", "off", "imagenet")
    assert ev.get_args(["--task", "finetune", "--crop-size", "64"]).base_size == 64  # images scaled around the crop
    args = ev.get_args(["--data", "cityscapes", "--val-resize", "0", "0", "--slide", "0", "0", "--cat-max", "1"])
    assert args.val_resize is None and args.slide is None and args.cat_max == 1


def test_lr_schedules_step_and_poly():
    step = ev.get_args(["--task", "finetune", "--data", "voc"])
    assert [ev.lr_at(s, step) for s in (0, 20999, 21000, 26999, 27000, 29999)] == pytest.approx(
        [0.003, 0.003, 3e-4, 3e-4, 3e-5, 3e-5])
    poly = ev.get_args(["--task", "finetune", "--data", "ade20k"])  # mmcv: (lr - min_lr)(1 - t/T)^0.9 + min_lr
    assert [ev.lr_at(s, poly) for s in (0, 40000, 79999)] == pytest.approx(
        [0.01, (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4, (0.01 - 1e-4) * (1 / 80000) ** 0.9 + 1e-4])


def test_fcn_d6_head_is_the_configs():
    model = ev.Segmenter("resnet50", "finetune", "fcn", 21, 16, aux=False, fcn_head="d6")
    convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.dilation[0]) for c in convs] == [(2048, 256, 6), (256, 256, 6), (256, 21, 1)]
    assert model.head.fuse is None and model.aux is None and model.head.classifier[0].p == 0.0
    assert model.backbone.layer4[0].conv2.stride == (1, 1) and model.backbone.layer3[0].conv2.stride == (2, 2)  # OS 16
    x = seg_data.normalise(Image.new("RGB", (4, 4), (255, 0, 0)), "moco-configs")  # 0-1 constants on 0-255 pixels
    assert x[0, 0, 0].item() == pytest.approx((255 - 0.485) / 0.229) and x[1, 0, 0].item() == pytest.approx(-0.456 / 0.224)


class PerPixel(torch.nn.Module):
    """A 'segmenter' whose logits at a pixel are that pixel's input (any window gives the same value)."""
    def forward(self, x):
        return x, None, x


@pytest.mark.parametrize("size,crop,stride", [((10, 13), 4, 3), ((7, 7), 8, 5), ((9, 20), 5, 5)])
def test_slide_covers_every_pixel_and_averages_overlaps(size, crop, stride):
    x = torch.randn(1, 3, *size)
    logits, _ = ev.slide_logits(PerPixel(), x, crop, stride, None, torch.device("cpu"))
    torch.testing.assert_close(logits, x)  # a gap would divide by zero, a double count would not cancel


def test_cat_max_redraws_crops_dominated_by_one_class():
    label = np.ones((100, 100), np.uint8)
    label[:, 50:] = 2  # left half class 1, right half class 2: a 50 px crop is mixed only near the middle
    img = Image.new("RGB", (100, 100))
    share = lambda t: np.mean([np.bincount(t(img, label)[1].flatten().numpy()).max() / 2500 < 0.75 for _ in range(200)])
    np.random.seed(0)
    plain = share(seg_data.TrainTransform(50, (1, 1), base_size=100, cat_max=1.0))
    redrawn = share(seg_data.TrainTransform(50, (1, 1), base_size=100, cat_max=0.75))
    assert plain < 0.7 and redrawn > 0.95


def test_photometric_distortion_changes_colours_not_geometry():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    np.random.seed(0)
    outs = [np.asarray(seg_data.photometric(img), np.float32) for _ in range(20)]
    assert all(o.shape == (16, 16, 3) for o in outs)
    assert sum(np.abs(o - np.asarray(img, np.float32)).mean() > 1 for o in outs) >= 10


def test_voc_run_follows_the_protocol(tmp_path):
    _voc_tree(tmp_path)
    out = python("eval_dense.py", "--data", "voc", "--data-root", tmp_path, "--arch", "resnet18", "--task", "finetune",
                 "--head", "fcn", "--iters", "2", "--crop-size", "32", "--batch-size", "2", "--workers", "0",
                 "--pictures", "0", "--output-dir", tmp_path / "ev")
    assert "cat-max 1.0, photometric off | test: whole image resized to fit 513 x 2049" in out  # SlotCon's VOC config
    assert "predictions.png" not in out and not (tmp_path / "ev" / "predictions.png").exists()  # --pictures 0: none
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mIoU"] is not None and json.loads((tmp_path / "ev" / "args.json").read_text())["val_resize"] == [513, 2049]
