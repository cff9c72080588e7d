"""detection.py (eval_dense.py --task detect | instance): synthetic instances, the COCO layout,
COCO AP that reads 100 for the ground truth and less for worse boxes, decoder loading, whole runs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_dense
from conftest import REPO, python
from evaluation import detection

pytest.importorskip("pycocotools")  # an optional dependency of --task detect / instance (CI installs it)

SMALL = ["--arch", "resnet18", "--synthetic-size", "64", "--synthetic-train", "8", "--synthetic-val", "4", "--batch-size",
         "4", "--workers", "0", "--proposals", "50", "--rois-per-image", "32", "--log-every", "1"]


def test_synthetic_instances_are_the_label_map_split_into_objects():
    data = detection.SyntheticInstances(6, 64, seed=0, split="val", train=False, min_area=1)
    for i in range(6):
        img, boxes, labels, masks = data.annotations(i)
        _, label = common.synthetic_scene(common.VAL_INDEX_OFFSET + i, 0, 64)
        rebuilt = np.zeros_like(label)
        for b, l, m in zip(boxes.long().tolist(), labels.tolist(), masks.numpy().astype(bool)):
            ys, xs = np.nonzero(m)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == b  # tight boxes
            assert (label[m] == l).all()  # one class per object
            rebuilt[m] = l
        assert (rebuilt == label).all()  # occlusion applied: the visible parts tile the label map
        assert (masks.sum(0) <= 1).all()


class Oracle(torch.nn.Module):
    """Predicts the ground truth (optionally with its boxes shifted), score 1."""

    def __init__(self, dataset, shift=0.0):
        super().__init__()
        self.dataset, self.shift, self.next = dataset, shift, 0

    def forward(self, images):
        out = []
        for _ in images:
            _, boxes, labels, masks = self.dataset.annotations(self.next)
            self.next += 1
            w = boxes[:, 2:] - boxes[:, :2]
            out.append({"boxes": boxes + self.shift * torch.cat([w, w], 1), "labels": labels,
                        "scores": torch.ones(len(labels)), "masks": masks[:, None].float()})
        return out


@pytest.mark.parametrize("shift,expect", [(0.0, 100.0), (0.3, None)])
def test_coco_ap_reads_100_for_the_ground_truth_and_less_for_shifted_boxes(tmp_path, shift, expect):
    data = detection.SyntheticInstances(6, 64, seed=0, split="val", train=False)
    args = eval_dense.get_args(["--task", "instance", "--synthetic-size", "64", "--pictures", "2"])
    names = list(common.SYNTHETIC_CLASSES[1:])
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=detection.collate)
    m = detection.evaluate(Oracle(data, shift), loader, detection.coco_ground_truth(data, names), names, args,
                           torch.device("cpu"), tmp_path)
    if expect is not None:
        assert m["box_AP"] == pytest.approx(expect) and m["mask_AP"] == pytest.approx(expect)
    else:  # boxes off by 30% of their size: AP75 collapses, masks stay perfect
        assert m["box_AP75"] < 20 and m["box_AP"] < 60 and m["mask_AP"] == pytest.approx(100.0)
    assert (tmp_path / "predictions.png").exists()


def test_coco_layout(tmp_path):
    root = tmp_path / "coco"
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        Image.new("RGB", (40, 30), "gray").save(root / f"{split}2017" / "a.jpg")
        Image.new("RGB", (40, 30), "gray").save(root / f"{split}2017" / "b.jpg")
    ann = {"images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
                      {"id": 9, "file_name": "b.jpg", "width": 40, "height": 30}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "iscrowd": 0, "area": 100, "bbox": [5, 4, 10, 10],
                            "segmentation": [[5, 4, 15, 4, 15, 14, 5, 14]]},
                           {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 50, "bbox": [0, 0, 5, 10],
                            "segmentation": [[0, 0, 5, 0, 5, 10, 0, 10]]}],
           "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]}
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))
    assert len(detection.CocoInstances(tmp_path, "train", train=True, with_masks=True)) == 1  # b.jpg: no object
    data = detection.CocoInstances(tmp_path, "val", train=False, with_masks=True)
    assert len(data) == 2  # evaluation keeps every image
    x, t = data[0]  # the crowd box is never a training target
    assert x.shape == (3, 30, 40) and t["boxes"].tolist() == [[5, 4, 15, 14]] and t["labels"].tolist() == [2]
    assert t["masks"].shape == (1, 30, 40) and t["masks"][0, 8, 8] == 1 and t["masks"][0, 20, 30] == 0
    out = python("eval_dense.py", "--init", "random", "--task", "detect", "--data", "coco", "--data-root", tmp_path,
                 "--train-sizes", "32", "--test-size", "32", "--iters", "1", *SMALL[:2], *SMALL[10:], "--batch-size", "1",
                 "--output-dir", tmp_path / "run")
    assert "box_AP" in json.loads((tmp_path / "run" / "metrics.json").read_text()) and "coco: 2 classes, 1 train / 2 val" in out


def _coco_tree(tmp_path, images, annotations):
    root = tmp_path / "coco"
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        for im in images:
            if im["file_name"] == "broken.jpg":
                (root / f"{split}2017" / "broken.jpg").write_bytes(b"not a jpeg")
            elif im["file_name"] != "missing.jpg":
                Image.new("RGB", (40, 30), "gray").save(root / f"{split}2017" / im["file_name"])
    (root / "annotations").mkdir()
    ann = {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]}
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))
    return root / "annotations" / "instances_val2017.json"


def _box(i, image, cat, bbox):
    x, y, w, h = bbox
    return {"id": i, "image_id": image, "category_id": cat, "iscrowd": 0, "area": abs(w * h), "bbox": bbox,
            "segmentation": [[x, y, x + abs(w), y, x + abs(w), y + abs(h), x, y + abs(h)]]}


def test_coco_annotation_problems_are_named_and_train_and_val_alike(tmp_path):
    images = [{"id": i, "file_name": f, "width": 40, "height": 30}
              for i, f in ((1, "a.jpg"), (2, "missing.jpg"), (3, "broken.jpg"), (4, "e.jpg"))]
    ann = _coco_tree(tmp_path, images, [_box(10, 1, 18, [5, 4, 10, 10]), _box(11, 1, 3, [20, 5, -6, 8]),  # no area
                                        _box(12, 2, 3, [1, 1, 5, 5]), _box(13, 3, 3, [1, 1, 5, 5]),
                                        _box(14, 4, 18, [2, 2, 9, 9])])
    with pytest.warns(UserWarning) as said:
        train = detection.CocoInstances(tmp_path, "train", train=True, with_masks=False)
        val = detection.CocoInstances(tmp_path, "val", train=False, with_masks=False)
    text = " ".join(str(w.message) for w in said)
    assert "1 box(es) without area" in text and "[11]" in text and "missing.jpg" in text
    assert sorted(train.ids) == sorted(val.ids) == [1, 3, 4]  # the missing file is out of both
    gt = detection.coco_ground_truth(val, ["car", "dog"])
    assert sorted(gt.getAnnIds()) == [10, 13, 14]  # the box without area is out of the ground truth too
    x, t = train[0]
    assert t["boxes"].tolist() == [[5, 4, 15, 14]]  # and out of the training targets
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        assert val[1][0] is None and train[1][1]["image_id"] == 4  # evaluation skips it, training reads the next
    out = python("eval_dense.py", "--init", "random", "--task", "detect", "--data", "coco", "--data-root", tmp_path,
                 "--train-sizes", "32", "--test-size", "32", "--iters", "1", *SMALL[:2], *SMALL[10:], "--batch-size", "1",
                 "--output-dir", tmp_path / "run")
    assert "Traceback" not in out and "box_AP" in json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a category id that `categories` lacks: the file and the annotation named, no traceback, nothing written
    bad = json.loads(ann.read_text())
    bad["annotations"].append(_box(99, 1, 7, [1, 1, 4, 4]))
    ann.write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match=r"instances_val2017.json: annotation 99 \(image 1\) has category_id 7"):
        detection.CocoInstances(tmp_path, "val", train=False, with_masks=False)
    proc = subprocess.run([sys.executable, "eval_dense.py", "--init", "random", "--task", "detect", "--data", "coco",
                           "--data-root", str(tmp_path), "--iters", "1", *SMALL[:2], "--workers", "0",
                           "--output-dir", str(tmp_path / "run2")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "category_id 7" in proc.stderr
    assert not (tmp_path / "run2").exists()


def test_decoder_and_region_head_load_into_the_detector():
    import mcl
    args = eval_dense.get_args(["--task", "detect", "--init-decoder", *SMALL])
    fpn = common.FPN([64, 128, 256, 512], 256)
    for p in fpn.parameters():
        torch.nn.init.normal_(p)
    convs = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in mcl.RegionHead().convs.state_dict().items()}
    meta = {"decoder": fpn.state_dict(), "decoder_cfg": fpn.config, "region_head_convs": convs, "method": "mcl"}
    model = detection.build_model(args, "resnet18", 9, None, meta)
    body = model.backbone.fpn
    for i in range(4):
        assert torch.equal(body.inner_blocks[i][0].weight, fpn.lateral[i][0].weight)
        assert torch.equal(body.layer_blocks[i][1].running_var, fpn.output[f"p{i + 2}"][1].running_var)
    assert torch.equal(model.roi_heads.box_head[3][0].weight, convs["9.weight"])  # conv 4 of 4
    assert torch.equal(model.roi_heads.box_head[3][1].bias, convs["10.bias"])


def test_instance_run_on_synthetic_scenes(tmp_path):
    python("eval_dense.py", "--init", "random", "--task", "instance", "--iters", "2", *SMALL, "--output-dir", tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"} <= m.keys()
    assert (tmp_path / "predictions.png").exists() and (tmp_path / "checkpoint.pth").exists()


def test_without_pycocotools_the_task_stops_with_the_install_command():
    code = ("import sys; sys.modules['pycocotools'] = None; sys.argv = ['eval_dense.py', '--task', 'detect']; "
            "import eval_dense; eval_dense.main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pip install pycocotools" in proc.stderr
