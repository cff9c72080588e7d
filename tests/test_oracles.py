"""Oracle tests: a stand-in network that knows the answer runs through the real evaluation path of each
protocol, at its defaults, and must score what the protocol's official code scores for it.

- Segmentation: a network at the protocol's output stride whose logits are the true label at each
  feature position. evaluate() at the default batch and at batch 1 must equal the score computed here
  the mmsegmentation way (each image alone, unpadded: logits resized to the input, then to the label).
- Detection (C4 on VOC, FPN on COCO): the RPN proposes the ground-truth boxes (and jittered copies that
  NMS must remove), the box predictor names their class: AP 100 through torchvision's post-processing
  and the VOC / COCO evaluators, also under CPU bf16 autocast (what a GPU user's --amp bf16 runs),
  where every box tensor must stay fp32.
- k-NN and linear: features that are one-hot labels give 100% top-1.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import common
import eval_dense as ev
from evaluation import classification, detection, seg_data, voc

CPU = torch.device("cpu")


# =================================================================================================
# Segmentation
# =================================================================================================
class LabelReader(nn.Module):
    """Knows the answer: the test images are painted with their label (red = 12 x class), so it reads
    the class at every `stride`-th pixel (the true label at each feature position) and returns it one
    hot: (B, K, ceil(H / s), ceil(W / s)), through a 1x1 conv so that autocast treats it as a network."""

    def __init__(self, stride, num_classes, norm):
        super().__init__()
        self.stride, self.num_classes, self.norm = stride, num_classes, norm
        self.conv = nn.Conv2d(num_classes, num_classes, 1, bias=False)
        nn.init.eye_(self.conv.weight[:, :, 0, 0])

    def forward(self, x):
        red = seg_data.denormalise(x.float(), self.norm)[:, 0] * 255  # (B, H, W)
        cls = (red / 12).round().long().clamp(0, self.num_classes - 1)[:, ::self.stride, ::self.stride]  # (B, h, w)
        logits = self.conv(F.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float())  # (B, K, h, w)
        return logits, None, logits


def _painted(label, rng):
    """An image whose red channel tells each pixel's class (ignored pixels: class 0's red)."""
    img = rng.integers(0, 256, (*label.shape, 3)).astype(np.uint8)
    img[..., 0] = np.where(label == 255, 0, label * 12)
    return img


def _labels(h, w, num_classes, rng):
    label = np.zeros((h, w), np.uint8)
    for _ in range(6):  # rectangles of random classes (at most 20: the red channel tells them); a band ignored
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        label[y0:y0 + rng.integers(10, 120), x0:x0 + rng.integers(10, 120)] = rng.integers(1, min(num_classes, 21))
    label[rng.integers(0, h - 5):][:3] = 255
    return label


def _seg_tree(root, data, sizes, rng):
    """VOC, Cityscapes or ADE20K as their tools lay them out: the validation split at VOC-like sizes,
    and 16 small training images (one default batch: the loaders are built as a run builds them)."""
    train_ids = []
    for n in range(16):
        label = np.zeros((40, 40), np.uint8)
        if data == "voc":
            base, train_ids = root / "VOCdevkit" / "VOC2012", train_ids + [f"2008_{n:06d}"]
            paths = base / "JPEGImages" / f"2008_{n:06d}.jpg", base / "SegmentationClass" / f"2008_{n:06d}.png"
        elif data == "cityscapes":
            base = root / "cityscapes"
            paths = (base / "leftImg8bit" / "train" / "aachen" / f"aachen_{n}_0_leftImg8bit.png",
                     base / "gtFine" / "train" / "aachen" / f"aachen_{n}_0_gtFine_labelTrainIds.png")
        else:
            base = root / "ADEChallengeData2016"
            paths = base / "images" / "training" / f"ADE_train_{n:08d}.jpg", base / "annotations" / "training" / f"ADE_train_{n:08d}.png"
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_painted(label, rng)).save(paths[0], format="PNG")
        Image.fromarray(label).save(paths[1])
    for n, (h, w) in enumerate(sizes):
        if data == "voc":
            label = _labels(h, w, 21, rng)
            base = root / "VOCdevkit" / "VOC2012"
            paths = base / "JPEGImages" / f"2007_{n:06d}.jpg", base / "SegmentationClass" / f"2007_{n:06d}.png"
            stored = label
        elif data == "cityscapes":
            label = _labels(h, w, 19, rng)
            base = root / "cityscapes"
            paths = (base / "leftImg8bit" / "val" / "lindau" / f"lindau_{n}_0_leftImg8bit.png",
                     base / "gtFine" / "val" / "lindau" / f"lindau_{n}_0_gtFine_labelTrainIds.png")
            stored = label
        else:  # ADE20K stores class + 1, 0 for "other"
            label = _labels(h, w, 150, rng)
            base = root / "ADEChallengeData2016"
            paths = base / "images" / "validation" / f"ADE_val_{n:08d}.jpg", base / "annotations" / "validation" / f"ADE_val_{n:08d}.png"
            stored = np.where(label == 255, 0, label + 1).astype(np.uint8)
            label = np.where(label == 255, 255, label)
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        # PNG everywhere keeps the painted classes exact (a JPEG's name, a PNG's bytes: PIL reads either)
        Image.fromarray(_painted(label, rng)).save(paths[0], format="PNG")
        Image.fromarray(stored).save(paths[1])
    if data == "voc":
        lists = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True)
        (lists / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
        (lists / "val.txt").write_text("".join(f"2007_{n:06d}\n" for n in range(len(sizes))))


def mmseg_score(model, dataset, num_classes, align):
    """What mmsegmentation computes: each image alone, unpadded, logits resized to the input, then to
    the label (its whole_inference with rescale); slide windows where the protocol slides."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(len(dataset)):
        x, y = dataset[i]
        logits = model(x[None])[0].float()
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align)
        pred = F.interpolate(logits, size=y.shape, mode="bilinear", align_corners=align).argmax(1)[0]
        valid = y < num_classes
        conf += torch.bincount(y[valid] * num_classes + pred[valid], minlength=num_classes ** 2).view(num_classes, -1)
    return ev.metrics_from_confusion(conf, [str(c) for c in range(num_classes)])["mIoU"]


@pytest.mark.parametrize("data,stride", [("voc", 16), ("ade20k", 8), ("cityscapes", 16)])
def test_a_network_that_reads_the_true_label_scores_the_mmseg_ceiling(tmp_path, data, stride):
    rng = np.random.default_rng(0)
    sizes = {"voc": [(375, 500), (333, 500), (500, 375), (375, 500)], "ade20k": [(256, 341), (300, 400), (341, 256)],
             "cityscapes": [(256, 512), (256, 512)]}[data]
    _seg_tree(tmp_path, data, sizes, rng)
    args = ev.get_args(["--task", "finetune", "--data", data, "--data-root", str(tmp_path), "--workers", "0"])
    assert args.output_stride == stride and args.amp == "fp32"  # the protocol's, as a user gets them
    if data == "cityscapes":
        args.slide = [200, 150]  # the protocol's sliding windows (769 / 513), scaled to these small images
    _, loader, num_classes, names = seg_data.build_data(args, CPU)
    model = LabelReader(stride, num_classes, args.input_norm)
    align = args.align_corners == "on"
    if args.slide:  # mmsegmentation's slide_inference on each image, written out here
        ref = lambda x: ev.slide_logits(model, x, *args.slide, None, CPU, align)[0]
        reference = mmseg_score(lambda x: (ref(x),), loader.dataset, num_classes, align)
    else:
        reference = mmseg_score(model, loader.dataset, num_classes, align)
    assert loader.batch_size > 1  # the default batch: images of several sizes in one
    scores = {"default batch": ev.evaluate(model, loader, num_classes, names, args, None, CPU)["mIoU"]}
    one = torch.utils.data.DataLoader(loader.dataset, batch_size=1, collate_fn=loader.collate_fn)
    scores["batch 1"] = ev.evaluate(model, one, num_classes, names, args, None, CPU)["mIoU"]
    scores["bf16 autocast"] = ev.evaluate(model, loader, num_classes, names, args, torch.bfloat16, CPU)["mIoU"]
    assert 40 < reference < 100  # boundaries between feature positions cost a little, nothing else
    assert scores == pytest.approx({k: reference for k in scores}, abs=1e-9)


# =================================================================================================
# Detection
# =================================================================================================
class GroundTruthProposals(nn.Module):
    """The RPN of a detector that knows the answer: for each image (in the loader's order) the
    ground-truth boxes, scaled to the resized input, plus `copies` jittered copies of each, which
    the box head's NMS must remove. Remembers each proposal's class and score for the predictor."""

    def __init__(self, truths, copies=4, jitter=0.04, seed=0):
        super().__init__()
        self.truths, self.copies, self.jitter = list(truths), copies, jitter  # [(boxes (n, 4), labels (n,), (h, w))]
        self.generator, self.labels, self.weights = torch.Generator().manual_seed(seed), [], []
        self.head = nn.Identity()  # the real RPN's conv head, which autocast wraps: not used

    def forward(self, images, features, targets=None):
        proposals = []
        self.labels, self.weights = [], []
        for size in images.image_sizes:
            boxes, labels, (h, w) = self.truths.pop(0)
            scale = torch.tensor([size[1] / w, size[0] / h] * 2)
            boxes = boxes * scale  # (n, 4) in the resized image
            side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (n, 4)
            shaken = [boxes + self.jitter * side * (2 * torch.rand(boxes.shape, generator=self.generator) - 1)
                      for _ in range(self.copies)]
            proposals.append(torch.cat([boxes, *shaken]))  # (n (1 + copies), 4)
            self.labels.append(labels.repeat(1 + self.copies))
            self.weights.append(torch.cat([torch.ones(len(boxes))] + [torch.full((len(boxes),), 0.8)] * self.copies))
        return proposals, {}


class NamesTheClass(nn.Module):
    """The box predictor that knows the answer: logits 12 x (one-hot class) x weight (the true box
    scores highest), no box regression; Linear layers, so that autocast treats it as a network."""

    def __init__(self, rpn, num_classes):
        super().__init__()
        self.rpn, self.num_classes = rpn, num_classes
        self.cls_score, self.bbox_pred = nn.Linear(num_classes, num_classes), nn.Linear(num_classes, 4 * num_classes)
        with torch.no_grad():
            self.cls_score.weight.copy_(12 * torch.eye(num_classes)), self.cls_score.bias.zero_()
            self.bbox_pred.weight.zero_(), self.bbox_pred.bias.zero_()

    def forward(self, x):  # x: the box head's features, ignored
        onehot = F.one_hot(torch.cat(self.rpn.labels), self.num_classes).float() * torch.cat(self.rpn.weights)[:, None]
        return self.cls_score(onehot), self.bbox_pred(onehot)


def knowing_detector(model, truths, num_classes, amp):
    """The real detector (transform, RoI pooling, box head, post-processing) with the RPN and box
    predictor that know the answer, autocast as eval_dense.py sets it for --amp."""
    model.rpn = GroundTruthProposals(truths)
    model.roi_heads.box_predictor = NamesTheClass(model.rpn, num_classes)
    return detection.autocast_networks(model.eval(), CPU, torch.bfloat16 if amp == "bf16" else None)


def record_box_dtypes(monkeypatch):
    """The dtypes of the boxes NMS sees and of the box coder's decoded boxes and regression targets."""
    seen = []
    nms = torchvision.ops.boxes.batched_nms
    coder = torchvision.models.detection._utils.BoxCoder
    decode, encode = coder.decode, coder.encode

    def recording_nms(boxes, scores, idxs, threshold):
        seen.append(boxes.dtype)
        return nms(boxes, scores, idxs, threshold)

    def recording_decode(self, codes, boxes):
        out = decode(self, codes, boxes)
        seen.append(out.dtype)
        return out

    def recording_encode(self, reference, proposals):
        out = encode(self, reference, proposals)
        seen.extend(t.dtype for t in out)
        return out

    monkeypatch.setattr(torchvision.ops.boxes, "batched_nms", recording_nms)
    monkeypatch.setattr(coder, "decode", recording_decode)
    monkeypatch.setattr(coder, "encode", recording_encode)
    return seen


# Objects of VOC's last classes, where a bf16 per-class NMS offset (label x (max + 1)) is coarsest.
VOC_OBJECTS = {"000001": [("tvmonitor", 0, 35, 46, 230, 208), ("train", 0, 254, 24, 458, 300), ("tvmonitor", 0, 410, 320, 441, 352)],
               "000002": [("sheep", 0, 70, 70, 350, 230), ("tvmonitor", 1, 7, 230, 92, 334)],
               "000003": [("sofa", 0, 140, 58, 460, 324), ("train", 0, 12, 12, 44, 36)]}


def _voc_detection_tree(root):
    for year, sets in (("2007", {"trainval": ["000001"], "test": ["000001", "000002", "000003"]}), ("2012", {"trainval": []})):
        base = root / "VOCdevkit" / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for split, ids in sets.items():
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
            for i in ids:
                Image.new("RGB", (500, 375), "gray").save(base / "JPEGImages" / f"{i}.jpg")
                objects = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin>"
                                  f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                                  for c, d, x0, y0, x1, y1 in VOC_OBJECTS[i])
                (base / "Annotations" / f"{i}.xml").write_text(
                    f"<annotation><size><width>500</width><height>375</height></size>{objects}</annotation>")


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_c4_on_voc_with_the_answer_scores_ap_100_and_keeps_boxes_in_fp32(tmp_path, monkeypatch, amp):
    _voc_detection_tree(tmp_path)
    args = ev.get_args(["--task", "detect", "--data", "voc", "--data-root", str(tmp_path), "--arch", "resnet18",
                        "--workers", "0", "--pictures", "0", "--amp", amp, "--batch-size", "1"])  # one training image
    _, loader, num_classes, names = detection.build_data(args, CPU)
    assert loader.batch_size == 1  # detectron2 tests one image per GPU
    data = loader.dataset
    truths = [(data[i][1]["boxes"], data[i][1]["labels"], (375, 500)) for i in range(len(data))]
    model = detection.build_c4(args, "resnet18", num_classes, None, {})
    model.transform.min_size = (args.test_size,)
    assert model.transform.size_divisible == 1  # C4: no padding to a multiple of 32 (detectron2: 0)
    seen = record_box_dtypes(monkeypatch)
    model = knowing_detector(model, truths, num_classes, amp)
    outputs = []
    model.register_forward_hook(lambda m, i, o: outputs.extend(o))
    metrics = detection.evaluate_voc(model, loader, names, args, CPU, tmp_path)
    assert [len(o["boxes"]) for o in outputs] == [len(t[1]) for t in truths]  # NMS left one detection per object
    assert all(o["boxes"].dtype == torch.float32 for o in outputs)
    assert metrics == pytest.approx({"box_AP": 100.0, "box_AP50": 100.0, "box_AP75": 100.0})
    assert seen and set(seen) == {torch.float32}


def _coco_tree(root, boxes_per_image):
    """COCO 2017's layout: val2017/*.jpg and annotations/instances_val2017.json (xywh boxes)."""
    images, annotations = [], []
    (root / "coco" / "val2017").mkdir(parents=True)
    for i, boxes in enumerate(boxes_per_image):
        Image.new("RGB", (120, 90), "gray").save(root / "coco" / "val2017" / f"{i:012d}.jpg")
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": 120, "height": 90})
        for cat, (x, y, w, h) in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 18, 90)]  # COCO's ids are not contiguous
    (root / "coco" / "annotations").mkdir()
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats}))


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_fpn_on_coco_with_the_answer_scores_ap_100_and_keeps_boxes_in_fp32(tmp_path, monkeypatch, amp):
    pytest.importorskip("pycocotools")
    _coco_tree(tmp_path, [[(90, (4, 6, 30, 20)), (18, (50, 40, 60, 45))], [(3, (10, 10, 100, 70)), (1, (2, 2, 9, 12))]])
    args = ev.get_args(["--task", "detect", "--data", "coco", "--data-root", str(tmp_path), "--arch", "resnet18",
                        "--workers", "0", "--pictures", "0", "--amp", amp])
    args.test_size = 600
    val = detection.CocoInstances(tmp_path, "val", train=False, with_masks=False)
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=detection.collate)
    truths = [(t["boxes"], t["labels"], tuple(x.shape[-2:])) for x, t in (val[i] for i in range(len(val)))]
    model = detection.build_model(args, "resnet18", 81, None, {})
    model.transform.min_size = (args.test_size,)
    assert isinstance(model.roi_heads.box_roi_pool, detection.MultiScaleRoIAlignV2)
    seen = record_box_dtypes(monkeypatch)
    names = [c["name"] for c in val.coco.loadCats(val.cat_ids)]
    metrics = detection.evaluate(knowing_detector(model, truths, 81, amp), loader, val.coco, names, args, CPU, tmp_path)
    assert metrics == pytest.approx({"box_AP": 100.0, "box_AP50": 100.0, "box_AP75": 100.0})
    assert seen and set(seen) == {torch.float32}


def test_training_under_bf16_computes_every_box_and_target_in_fp32(monkeypatch):
    # A training forward of the real C4 detector under CPU bf16 autocast: anchors decoded, proposals
    # suppressed, RoIs sampled and regression targets encoded in fp32; the losses are fp32.
    args = ev.get_args(["--task", "detect", "--data", "voc", "--arch", "resnet18", "--proposals", "50",
                        "--rois-per-image", "16"])
    model = detection.build_c4(args, "resnet18", 21, None, {})
    model.transform.min_size, model.transform.max_size = (96,), 128
    model = detection.autocast_networks(model, CPU, torch.bfloat16)
    seen = record_box_dtypes(monkeypatch)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([20])}]
    losses = model([torch.rand(3, 96, 128)], targets)
    assert seen and set(seen) == {torch.float32}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# =================================================================================================
# k-NN and linear
# =================================================================================================
class OneHotFeatures(nn.Module):
    """Knows the answer: the test images are one colour per class (red = 40 x class + 20), so the
    features are the class one-hot at every position: (B, K, h, w)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        red = (x[:, 0] * common.IMAGENET_STD[0] + common.IMAGENET_MEAN[0]) * 255  # (B, H, W)
        cls = ((red - 20) / 40).round().long().clamp(0, self.num_classes - 1)
        return F.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)


@pytest.mark.parametrize("task", ["knn", "linear"])
def test_features_that_are_the_labels_give_100_top1(tmp_path, monkeypatch, task):
    root = tmp_path / "images"
    for split, n in (("train", 8), ("val", 3)):
        for c in range(4):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 7 * i, 36), (40 * c + 20, 90, 200)).save(root / split / f"n{c:08d}" / f"{i}.png")
    monkeypatch.setattr(classification, "build_backbone", lambda *a: OneHotFeatures(4))
    flags = ["--init", "random", "--arch", "resnet18", "--task", task, "--data", str(root), "--crop-size", "32",
             "--workers", "0", "--output-dir", str(tmp_path / "out")]
    results = ev.main(flags + (["--epochs", "6", "--batch-size", "8"] if task == "linear" else []))
    assert results["top1"] == 100.0 and results["top5"] == 100.0
    if task == "linear":
        assert results["top1_last"] == 100.0
