"""eval_dense.py --task detect --data voc (evaluation/voc.py, detection.build_c4): the VOC XML tree,
VOC's metric (the ground truth as predictions scores 100, shifted boxes less, difficult objects
ignored, the 11-point interpolation), the R50-C4 detector's shapes, and a whole run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval_dense as ev
from conftest import python
from evaluation import detection, voc

OBJECTS = {  # image id -> [(class, difficult, xmin, ymin, xmax, ymax)] (1-based, as VOC writes them)
    "000001": [("dog", 0, 5, 6, 30, 28), ("person", 0, 34, 4, 58, 40)],
    "000002": [("car", 0, 10, 10, 50, 30), ("car", 1, 1, 30, 12, 44)],
    "000003": [("dog", 0, 20, 8, 60, 44)],
    "2008_000004": [("bird", 0, 3, 3, 20, 20)],
}


def _voc_tree(root):
    for year, sets in (("2007", {"trainval": ["000001", "000002"], "test": ["000003", "000002", "000001"]}),
                       ("2012", {"trainval": ["2008_000004"]})):
        base = root / "VOCdevkit" / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for split, ids in sets.items():
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
            for i in ids:
                Image.new("RGB", (64, 48), "gray").save(base / "JPEGImages" / f"{i}.jpg")
                objects = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin>"
                                  f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                                  for c, d, x0, y0, x1, y1 in OBJECTS[i])
                (base / "Annotations" / f"{i}.xml").write_text(
                    f"<annotation><size><width>64</width><height>48</height><depth>3</depth></size>{objects}</annotation>")


def test_voc_tree_reads_07_12_trainval_and_07_test(tmp_path):
    _voc_tree(tmp_path)
    train = voc.VocDetection(tmp_path, voc.TRAIN_SETS, train=False)
    test = voc.VocDetection(tmp_path, voc.TEST_SETS, train=False)
    assert len(train) == 3 and len(test) == 3
    x, t = train[1]  # 000002: the difficult car is kept for training, as detectron2
    assert x.shape == (3, 48, 64) and t["labels"].tolist() == [7, 7]
    assert t["boxes"].tolist()[0] == [9, 9, 50, 30]  # 0-based: xmin - 1, ymin - 1
    labels, difficult, boxes = test.ground_truth(1)
    assert labels.tolist() == [6, 6] and difficult.tolist() == [False, True] and boxes[0].tolist() == [10, 10, 50, 30]


def _as_predictions(data, shift=0.0, score=0.9):
    """The ground truth of every image as detections (0-based, as the detector gives them)."""
    out = {}
    for i in range(len(data)):
        labels, _, boxes = data.ground_truth(i)
        b = boxes.copy()
        b[:, [0, 1]] -= 1  # the detector's 0-based corners
        w = b[:, 2] - b[:, 0]
        b[:, [0, 2]] += shift * w[:, None]
        out[i] = (b, np.full(len(b), score), labels + 1)
    return out


def test_ground_truth_scores_100_and_shifted_boxes_less(tmp_path):
    _voc_tree(tmp_path)
    test = voc.VocDetection(tmp_path, voc.TEST_SETS, train=False)
    gt = {i: test.ground_truth(i) for i in range(len(test))}
    perfect = voc.voc_metrics(_as_predictions(test), gt)
    assert perfect == pytest.approx({"box_AP": 100.0, "box_AP50": 100.0, "box_AP75": 100.0})
    shifted = voc.voc_metrics(_as_predictions(test, shift=0.3), gt)  # IoU ~0.54: passes 0.5, fails 0.75
    assert shifted["box_AP50"] == pytest.approx(100.0) and shifted["box_AP75"] == 0 and shifted["box_AP"] < 20
    # a false positive ranked first costs precision; a hit on a difficult object is neither right nor wrong
    preds = _as_predictions(test)
    boxes, scores, labels = preds[1]  # 000002: car, difficult car
    preds[1] = (np.concatenate([boxes, [[40.0, 0.0, 63.0, 8.0]]]), np.array([0.9, 0.5, 0.95]), np.concatenate([labels, [7]]))
    assert voc.voc_metrics(preds, gt)["box_AP50"] < 100
    preds = _as_predictions(test)
    preds[1] = (preds[1][0], np.array([0.5, 0.99]), preds[1][2])  # the difficult one ranked first: ignored
    assert voc.voc_metrics(preds, gt)["box_AP50"] == pytest.approx(100.0)


def test_a_duplicate_detection_is_a_false_positive():
    gt = {0: (np.array([0, 0]), np.array([False, False]), np.array([[1.0, 1, 10, 10], [21, 21, 30, 30]]))}
    dets = [(0, 0.9, [1.0, 1, 10, 10]), (0, 0.8, [1.0, 1, 10, 10]), (0, 0.7, [21.0, 21, 30, 30])]  # A, A again, B
    # precision 1 up to recall 0.5, 2/3 at recall 1: the 11-point AP
    assert voc.class_ap(dets, gt, 0, 0.5) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_eleven_point_interpolation():
    recall = np.array([0.2, 0.4, 0.4, 0.8])
    precision = np.array([1.0, 1.0, 0.5, 0.6])
    # t = 0, .1, .2: max precision at recall >= t is 1.0; .3, .4: 1.0; .5 - .8: 0.6; .9, 1.0: 0
    assert voc.voc_ap(recall, precision, True) == pytest.approx((5 * 1.0 + 4 * 0.6) / 11)
    assert voc.voc_ap(recall, precision, False) == pytest.approx(0.4 * 1.0 + 0.4 * 0.6)


def test_c4_detector_shapes(tmp_path):
    args = ev.get_args(["--task", "detect", "--data", "voc"])
    assert (args.detector, args.iters, args.steps, args.warmup, args.test_size, args.proposals) == ("c4", 24000, [18000, 22000], 100, 800, 2000)
    assert args.train_sizes == list(range(480, 801, 32)) and args.lr == 0.02 and args.batch_size == 16
    model = detection.build_c4(args, "resnet50", 21, None, {})
    assert model.backbone.out_channels == 1024 and model.rpn.anchor_generator.num_anchors_per_location() == [15]
    x = torch.randn(1, 1024, 20, 24)  # res4 at stride 16
    rois = [torch.tensor([[0.0, 0.0, 160.0, 160.0], [32.0, 16.0, 96.0, 200.0]])]
    pooled = model.roi_heads.box_roi_pool({"0": x}, rois, [(320, 384)])
    assert pooled.shape == (2, 1024, 14, 14)
    head = model.roi_heads.box_head.eval()
    assert head.res5(pooled).shape == (2, 2048, 7, 7) and head(pooled).shape == (2, 2048)
    cls, box = model.roi_heads.box_predictor(head(pooled))
    assert cls.shape == (2, 21) and box.shape == (2, 84)
    # the aligned pooler (ROIAlignV2): a box of one feature cell reads that cell's value at its centre
    cell = torch.zeros(1, 1, 4, 4)
    cell[0, 0, 1, 2] = 1.0
    out = detection.RoIAlignV2(1, 1.0)({"0": cell}, [torch.tensor([[2.0, 1.0, 3.0, 2.0]])], None)
    assert out.item() == pytest.approx(1.0)


def test_voc_c4_run(tmp_path):
    _voc_tree(tmp_path)
    python("eval_dense.py", "--init", "random", "--arch", "resnet18", "--task", "detect", "--data", "voc", "--data-root",
           tmp_path, "--iters", "2", "--batch-size", "2", "--train-sizes", "64", "--test-size", "64", "--proposals", "50",
           "--rois-per-image", "32", "--workers", "0", "--output-dir", tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m) >= {"box_AP", "box_AP50", "box_AP75"} and 0 <= m["box_AP50"] <= 100


@pytest.mark.parametrize("flags,says", [(["--task", "instance", "--data", "voc", "--detector", "fpn"], "no instance masks"),
                                        (["--task", "detect", "--data", "voc", "--init-decoder"], "--detector fpn")])
def test_voc_combinations_that_cannot_work_are_refused(flags, says, capsys):
    with pytest.raises(SystemExit):
        ev.get_args(flags)
    assert says in capsys.readouterr().err
