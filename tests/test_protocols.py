"""The downstream protocols against their official code: precision defaults, VOC's label folders and
lists as mmsegmentation's and DeepLab's tools write them, mmsegmentation's loss and head init,
detectron2's warm-up, inits and RoI pooler, the linear protocols' best-epoch report, class sets,
and annotation problems named before training. (Whole protocols with a network that knows the answer:
test_oracles.py.)"""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

import common
import eval_dense as ev
from evaluation import classification, detection, seg_data, voc

CPU = torch.device("cpu")


@pytest.mark.parametrize("task", ["probe", "finetune", "detect", "knn", "linear"])
def test_every_protocol_runs_in_fp32_by_default_on_a_gpu_too(task):
    args = ev.get_args(["--task", task])
    assert args.amp == "fp32" and common.amp_dtype(args.amp, torch.device("cuda")) is None
    assert common.amp_dtype(ev.get_args(["--task", task, "--amp", "bf16"]).amp, torch.device("cuda")) == torch.bfloat16


# =================================================================================================
# VOC segmentation: which labels each list takes
# =================================================================================================
def _label(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8), value, np.uint8)).save(path)


def _voc_aug_tree(root, lists):
    """VOC2012 after mmsegmentation's tools/convert_datasets/voc_aug.py: SegmentationClass has the
    official labels of train (t1-t3) and val (v1, v2); SegmentationClassAug holds SBD's converted
    labels only (s1-s4, and SBD's own versions of t1 and v1, here of another value); aug.txt is SBD
    minus train and val, trainaug.txt train plus SBD minus val. DeepLab's train_aug.txt pairs paths."""
    base = root / "VOCdevkit" / "VOC2012"
    train, val, sbd = ["t1", "t2", "t3"], ["v1", "v2"], ["s1", "s2", "s3", "s4", "t1", "v1"]
    for i in train + val + sbd:
        _png = base / "JPEGImages" / f"{i}.jpg"
        _png.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6)).save(_png)
    for i in train + val:
        _label(base / "SegmentationClass" / f"{i}.png", 1)  # official
    for i in sbd:
        _label(base / "SegmentationClassAug" / f"{i}.png", 2)  # SBD's
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("t1\nt2\nt3\n")
    (sets / "val.txt").write_text("v1\nv2\n")
    if "aug.txt" in lists:
        (sets / "aug.txt").write_text("s1\ns2\ns3\ns4\n")
    if "trainaug.txt" in lists:
        (sets / "trainaug.txt").write_text("t1\nt2\nt3\ns1\ns2\ns3\ns4\n")
    if "train_aug.txt" in lists:  # DeepLab's: its SegmentationClassAug has every train image too
        for i in ("t2", "t3"):
            _label(base / "SegmentationClassAug" / f"{i}.png", 2)
        (sets / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                                    for i in train + ["s1", "s2", "s3", "s4"]))
    return base


@pytest.mark.parametrize("lists", [["aug.txt", "trainaug.txt"], ["trainaug.txt"], ["train_aug.txt"]])
def test_voc_reads_official_labels_for_train_and_val_and_sbd_labels_for_the_rest(tmp_path, lists):
    base = _voc_aug_tree(tmp_path, lists)
    val, _, _ = seg_data.seg_pairs("voc", tmp_path, "val")
    assert val == [(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ("v1", "v2")]
    train, _, _ = seg_data.seg_pairs("voc", tmp_path, "train")
    labels = {img.stem: lbl.parent.name for img, lbl in train}
    assert len(train) == 7 and all(img.is_file() and lbl.is_file() for img, lbl in train)
    assert labels == {"t1": "SegmentationClass", "t2": "SegmentationClass", "t3": "SegmentationClass",
                      "s1": "SegmentationClassAug", "s2": "SegmentationClassAug", "s3": "SegmentationClassAug",
                      "s4": "SegmentationClassAug"}
    _, y = seg_data.SegFiles(val, None, seg_data.val_transform)[0]
    assert (y == 1).all()  # v1's official label, not SBD's


def test_voc_without_an_augmented_list_trains_on_train_txt(tmp_path):
    _voc_aug_tree(tmp_path, [])
    train, _, _ = seg_data.seg_pairs("voc", tmp_path, "train")
    assert [img.stem for img, _ in train] == ["t1", "t2", "t3"]


def test_a_listed_voc_image_without_its_files_is_named_before_training(tmp_path):
    base = _voc_aug_tree(tmp_path, ["aug.txt"])
    (base / "SegmentationClassAug" / "s3.png").unlink()
    with pytest.raises(SystemExit, match="1 file.* of train.txt .*aug.txt .* missing, e.g. .*SegmentationClassAug/s3.png"):
        seg_data.seg_pairs("voc", tmp_path, "train")


def test_cityscapes_train_ids_as_create_train_id_label_imgs_writes_them(tmp_path):
    img = tmp_path / "cityscapes" / "leftImg8bit" / "val" / "lindau" / "lindau_0_0_leftImg8bit.png"
    img.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(img)
    ids, train_ids = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    ids[0, :3], train_ids[0, :3] = [7, 26, 33], [0, 13, 18]  # road, car, bicycle; the rest "unlabeled"
    gt = tmp_path / "cityscapes" / "gtFine" / "val" / "lindau"
    _label(gt / "lindau_0_0_gtFine_labelIds.png", 0)
    Image.fromarray(ids).save(gt / "lindau_0_0_gtFine_labelIds.png")
    Image.fromarray(train_ids).save(gt / "lindau_0_0_gtFine_labelTrainIds.png")
    pairs, n, lut = seg_data.seg_pairs("cityscapes", tmp_path, "val")
    assert pairs[0][1].name.endswith("labelTrainIds.png") and lut is None
    from_train_ids = seg_data.SegFiles(pairs, lut, seg_data.val_transform)[0][1]
    from_ids = seg_data.SegFiles([(pairs[0][0], gt / "lindau_0_0_gtFine_labelIds.png")], seg_data.cityscapes_lut(),
                                 seg_data.val_transform)[0][1]
    assert torch.equal(from_train_ids, from_ids)


# =================================================================================================
# mmsegmentation's loss and FCN head
# =================================================================================================
def test_finetune_loss_is_mmsegs_mean_over_every_pixel_the_probe_over_labelled_ones():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 8, 8))
    y[:, :3] = seg_data.IGNORE
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    per_pixel = -up.log_softmax(1).gather(1, y.clamp(max=4)[:, None])[:, 0] * (y != seg_data.IGNORE)  # (2, 8, 8)
    finetune = ev.seg_loss(logits, y, ev.get_args(["--task", "finetune"]))
    probe = ev.seg_loss(logits, y, ev.get_args(["--task", "probe"]))
    assert finetune.item() == pytest.approx(per_pixel.sum().item() / y.numel(), rel=1e-6)
    assert probe.item() == pytest.approx(per_pixel.sum().item() / (y != seg_data.IGNORE).sum().item(), rel=1e-6)


def test_fcn_head_takes_mmcvs_init():
    torch.manual_seed(0)
    head = ev.FCNHead(512, 256, 21, concat=True, dilation=1, dropout=0.1)
    conv = head.convs[0][0].weight  # ConvModule: kaiming normal, fan_out, relu -> std sqrt(2 / (256 * 9))
    assert conv.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05) and abs(conv.mean().item()) < 1e-3
    assert head.fuse[0].weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    seg = head.classifier[1]  # conv_seg: N(0, 0.01), bias 0
    assert seg.weight.std().item() == pytest.approx(0.01, rel=0.1) and not seg.bias.any()
    assert all((m.weight == 1).all() and not m.bias.any() for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d))


# =================================================================================================
# detectron2's schedule, inits and pooler
# =================================================================================================
def test_detection_warmup_starts_at_a_thousandth_on_iteration_0():
    args = ev.get_args(["--task", "detect", "--data", "voc"])
    assert detection.lr_at(0, args) == pytest.approx(0.02 * 0.001)
    assert detection.lr_at(50, args) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))  # factor (1 - a) / 1000 + a
    assert detection.lr_at(100, args) == pytest.approx(0.02) and detection.lr_at(18000, args) == pytest.approx(0.002)


def test_fpn_detector_takes_detectron2s_inits():
    torch.manual_seed(0)
    args = ev.get_args(["--task", "instance", "--arch", "resnet18"])
    model = detection.build_model(args, "resnet18", 81, None, {})
    predictor, heads = model.roi_heads.box_predictor, model.roi_heads
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()
    assert heads.mask_predictor.mask_fcn_logits.weight.std().item() == pytest.approx(0.001, rel=0.1)
    fc = [m for m in heads.box_head.modules() if isinstance(m, torch.nn.Linear)][0]
    assert not fc.bias.any()  # c2_xavier_fill: kaiming uniform a=1 -> std sqrt(1/fan_in)
    assert fc.weight.std().item() == pytest.approx((1 / fc.in_features) ** 0.5, rel=0.05)
    assert model.transform.size_divisible == 32  # the FPN pads to 32, as detectron2's


def test_fpn_roi_pooler_is_roialignv2_on_detectron2s_level():
    torch.manual_seed(0)
    feats = {str(i): torch.randn(1, 3, 256 // 2 ** i, 256 // 2 ** i) for i in range(4)}  # P2-P5 of a 1024 px image
    sides = [50.0, 112.0, 224.0, 448.0, 1000.0]  # levels floor(4 + log2(side / 224)) clamped: P2, P3, P4, P5, P5
    boxes = torch.tensor([[10.0, 20.0, 10 + s, 20 + s] for s in sides])
    out = detection.MultiScaleRoIAlignV2(["0", "1", "2", "3"], 7)(feats, [boxes], [(1024, 1024)])
    for box, level, row in zip(boxes, [2, 3, 4, 5, 5], out):
        expect = roi_align(feats[str(level - 2)], [box[None]], 7, 1 / 2 ** level, sampling_ratio=0, aligned=True)[0]
        assert torch.allclose(row, expect, atol=1e-6)


# =================================================================================================
# Classification: best and last epoch, class sets, k
# =================================================================================================
def test_linear_reports_the_best_epoch_and_the_last_and_resumes_the_history(tmp_path, monkeypatch):
    scripted = iter([(50.0, 80.0), (90.0, 95.0), (70.0, 90.0)])
    monkeypatch.setattr(classification, "accuracy", lambda *a: next(scripted))
    flags = ["--task", "linear", "--arch", "resnet18", "--synthetic-train", "8", "--synthetic-val", "4",
             "--synthetic-size", "32", "--crop-size", "32", "--epochs", "3", "--batch-size", "4", "--workers", "0",
             "--output-dir", str(tmp_path / "lin")]
    results = ev.main(flags)
    assert (results["top1"], results["top5"], results["best_epoch"]) == (90.0, 95.0, 1)
    assert (results["top1_last"], results["top5_last"]) == (70.0, 90.0)
    logged = [json.loads(line) for line in (tmp_path / "lin" / "log.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in logged if "val_top1" in r] == [50.0, 90.0, 70.0]
    again = ev.main(flags)  # a finished run resumes with its history, validating nothing again
    assert (again["top1"], again["best_epoch"], again["top1_last"]) == (90.0, 1, 70.0)


def _folder(root, classes, images):
    for c in classes:
        (root / c).mkdir(parents=True)
        for name, img in images[c].items():
            img.save(root / c / name)


def test_knn_numbers_val_classes_as_train_does_and_refuses_classes_train_lacks(tmp_path):
    rng = np.random.default_rng(0)
    images = {c: {f"{i}.png": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)}
              for c in "abc"}
    _folder(tmp_path / "d" / "train", "abc", images)
    _folder(tmp_path / "d" / "val", "ac", images)  # val: copies of train's a and c images, no b
    flags = ["--task", "knn", "--init", "random", "--arch", "resnet18", "--data", str(tmp_path / "d"), "--crop-size", "32",
             "--workers", "0", "--output-dir", str(tmp_path / "knn")]
    results = ev.main(flags + ["--k", "1"])
    assert results["top1"] == 100.0  # each copy's nearest neighbour is itself, of its own class
    results = ev.main(flags[:-1] + [str(tmp_path / "knn50"), "--k", "50"])
    assert (results["k"], results["k_asked"]) == (9, 50)
    assert json.loads((tmp_path / "knn50" / "metrics.json").read_text())["k"] == 9
    _folder(tmp_path / "d" / "val", "z", {"z": images["a"]})
    with pytest.raises(SystemExit, match="val/ has class folders that train/ lacks \\(z\\)"):
        ev.main(flags[:-1] + [str(tmp_path / "knn2")])


# =================================================================================================
# COCO and VOC annotations
# =================================================================================================
def test_coco_validation_without_annotations_has_no_ap(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 8, "height": 8}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    gt.createIndex()
    loader = torch.utils.data.DataLoader([(torch.rand(3, 8, 8), {"image_id": 1})], collate_fn=detection.collate)
    model = lambda images: [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}]
    model.eval = model.train = lambda: None
    args = ev.get_args(["--task", "detect", "--pictures", "0"])
    metrics = detection.evaluate(model, loader, gt, ["a"], args, CPU, tmp_path)
    assert metrics == {"box_AP": None, "box_AP50": None, "box_AP75": None}
    assert "no ground-truth object" in capsys.readouterr().out


def test_voc_annotation_problems_are_named_once_for_training_and_evaluation(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    xml = lambda objects: ("<annotation><size><width>50</width><height>40</height></size>" + "".join(
        f"<object><name>dog</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in objects) + "</annotation>")
    files = {"ok": xml([(5, 5, 20, 20)]), "flat": xml([(5, 5, 20, 20), (12, 5, 11, 20)]),  # xmin = xmax + 1: no area
             "outside": xml([(0, 5, 60, 20)]), "broken": "this is not XML <", "nojpeg": xml([(5, 5, 20, 20)])}
    for i, text in files.items():
        (base / "Annotations" / f"{i}.xml").write_text(text)
        if i != "nojpeg":
            Image.new("RGB", (50, 40)).save(base / "JPEGImages" / f"{i}.jpg")
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(files) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = voc.VocDetection(tmp_path, voc.TEST_SETS, train=False)
    said = "\n".join(str(w.message) for w in caught)
    for name in ("broken.xml", "nojpeg.jpg", "outside.xml", "flat.xml"):
        assert name in said, said
    assert [p.stem for p, _ in data.items] == ["ok", "flat", "outside"]
    assert [b for _, _, b in data.items[1][1]] == [[5, 5, 20, 20]]  # the flat box left out, in training and evaluation
    assert data.items[2][1][0][2] == [1, 5, 50, 20]  # clipped to the image
    assert data[1][1]["boxes"].tolist() == [[4, 4, 20, 20]] and data.ground_truth(1)[2].tolist() == [[5, 5, 20, 20]]


def test_export_into_a_new_folder_makes_it(tmp_path):
    common.save_downstream(tmp_path / "downstream.pth", "moco", "resnet18", common.ResNetTrunk("resnet18"))
    ev.main(["--init", str(tmp_path / "downstream.pth"), "--export", "torchvision", str(tmp_path / "new" / "deeper" / "r18.pth")])
    assert set(torch.load(tmp_path / "new" / "deeper" / "r18.pth", weights_only=True)) >= {"conv1.weight", "fc.weight"}
