"""PASCAL VOC detection for eval_dense.py --task detect --data voc: the VOC07+12 data and the VOC
metric, as MoCo's and DenseCL's detection tables (detectron2's pascal_voc.py and
pascal_voc_evaluation.py).

Data: VOC2007 trainval + VOC2012 trainval for training, VOC2007 test for evaluation, below
<data-root>/VOCdevkit/VOC{2007,2012}/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/*.txt}.
The XML annotations are read with the standard library; boxes are made 0-based as detectron2 does
(xmin - 1, ymin - 1); "difficult" objects are kept in training (detectron2: they do not hurt) and
ignored in evaluation. Checked once before training, for training and evaluation alike, each with a
warning naming the files: an image without its JPEG or with an unreadable XML is left out, a box
outside the image is clipped to it, a box without area (xmax < xmin) is left out.

Metric: per class and IoU threshold 0.50, 0.55, ..., 0.95, detectron2's voc_eval: detections of
the class sorted by score; each is a true positive if its best-overlapping ground truth (IoU in
VOC's +1-pixel convention, strictly above the threshold) is not difficult and not taken yet, ignored
if that ground truth is difficult, else a false positive; recall over the non-difficult objects; AP
with VOC2007's 11-point interpolation (the year of the test set). AP50 and AP75 are the class means
at 0.5 and 0.75, AP the mean over the ten thresholds, in percent: the three numbers of the papers'
VOC tables.
"""
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import common

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
           "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")  # detectron2's order
TRAIN_SETS = (("2007", "trainval"), ("2012", "trainval"))
TEST_SETS = (("2007", "test"),)


def parse_xml(path):
    """One VOC annotation file -> (width, height, [(class index, difficult, [xmin, ymin, xmax, ymax]) ...]),
    the box as written (1-based pixel coordinates)."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    objects = []
    for obj in root.findall("object"):
        name = obj.find("name").text.strip()
        if name not in CLASSES:
            raise SystemExit(f"{path}: object class {name!r} is not one of VOC's 20 ({', '.join(CLASSES)})")
        box = obj.find("bndbox")
        difficult = obj.find("difficult")
        objects.append((CLASSES.index(name), difficult is not None and int(difficult.text) == 1,
                        [float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]))
    return int(size.find("width").text), int(size.find("height").text), objects


class VocDetection(Dataset):
    """VOC images with their objects: (image (3, H, W) in [0, 1], target with boxes (0-based, as
    detectron2), labels 1-20 (0 is torchvision's background) and the image's index). Also keeps
    every image's ground truth as written, for the metric."""

    def __init__(self, root, sets, train):
        devkit = Path(root) / "VOCdevkit"
        self.items = []  # (image path, [(class, difficult, box)])
        for year, split in sets:
            base = devkit / f"VOC{year}"
            ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
            if not ids_file.is_file():
                raise SystemExit(f"--data voc: {ids_file} not found; VOC07+12 detection expects "
                                 f"{devkit}/VOC2007 (trainval, test) and {devkit}/VOC2012 (trainval), each with "
                                 f"Annotations/, JPEGImages/ and ImageSets/Main/")
            problems = {"not readable as VOC XML": [], "without its JPEG": [], "with boxes outside the image (clipped)": [],
                        "with boxes without area (left out)": []}
            for image_id in ids_file.read_text().split():
                xml, jpg = base / "Annotations" / f"{image_id}.xml", base / "JPEGImages" / f"{image_id}.jpg"
                if not jpg.is_file():
                    problems["without its JPEG"].append(jpg)
                    continue
                try:
                    width, height, objects = parse_xml(xml)
                except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as e:
                    problems["not readable as VOC XML"].append(f"{xml} ({type(e).__name__}: {e})")
                    continue
                clipped = [(c, d, [min(max(b[0], 1), width), min(max(b[1], 1), height), min(max(b[2], 1), width),
                                   min(max(b[3], 1), height)]) for c, d, b in objects]  # VOC's 1-based pixels
                if clipped != objects:
                    problems["with boxes outside the image (clipped)"].append(xml)
                kept = [(c, d, b) for c, d, b in clipped if b[2] - b[0] + 1 > 0 and b[3] - b[1] + 1 > 0]
                if len(kept) < len(clipped):
                    problems["with boxes without area (left out)"].append(xml)
                self.items.append((jpg, kept))
            for what, files in problems.items():  # training and evaluation see the same objects
                if files:
                    warnings.warn(f"--data voc {year} {split}: {len(files)} image(s) {what}"
                                  + ("" if "box" in what else ", left out") + ": " + ", ".join(map(str, files[:5]))
                                  + (" ..." if len(files) > 5 else ""))
        if not self.items:
            raise SystemExit(f"--data voc: no usable image in {', '.join(f'VOC{y} {s}' for y, s in sets)}")
        self.train = train

    def __len__(self):
        return len(self.items)

    def ground_truth(self, i):
        """(labels (n,) 0-19, difficult (n,) bool, boxes (n, 4) as written) of image i."""
        objects = self.items[i][1]
        return (np.array([o[0] for o in objects], int), np.array([o[1] for o in objects], bool),
                np.array([o[2] for o in objects], float).reshape(-1, 4))

    def __getitem__(self, i):
        path, objects = self.items[i]
        x = torch.from_numpy(np.array(common.open_rgb(path))).permute(2, 0, 1).float() / 255
        boxes = torch.tensor([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, _, b in objects], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([c + 1 for c, _, _ in objects], dtype=torch.int64),
                  "image_id": i}
        if self.train and np.random.rand() < 0.5:
            x = x.flip(-1)
            w = x.shape[-1]
            target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
        return x, target


def iou_plus_one(box, gts):
    """IoU of one box (4,) with boxes (n, 4) in VOC's pixel convention (a box covers x1..x2 inclusive)."""
    iw = np.maximum(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    union = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0) + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter
    return inter / union


def voc_ap(recall, precision, use_07_metric=True):
    """AP from a precision-recall curve: VOC2007's 11-point interpolation, or the area under the
    monotone precision envelope (VOC2010 on)."""
    if use_07_metric:
        return sum(np.max(precision[recall >= t], initial=0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11
    mrec, mpre = np.concatenate(([0.0], recall, [1.0])), np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def class_ap(detections, ground_truth, cls, threshold, use_07_metric=True):
    """detectron2's voc_eval for one class. detections: [(image, score, box as written)];
    ground_truth: {image: (labels, difficult, boxes)}."""
    gts = {i: (b[l == cls], d[l == cls]) for i, (l, d, b) in ground_truth.items()}
    taken = {i: np.zeros(len(b), bool) for i, (b, _) in gts.items()}
    npos = sum(int((~d).sum()) for _, d in gts.values())
    dets = sorted(detections, key=lambda d: -d[1])
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for n, (image, _, box) in enumerate(dets):
        boxes, difficult = gts.get(image, (np.zeros((0, 4)), np.zeros(0, bool)))
        overlaps = iou_plus_one(np.asarray(box, float), boxes) if len(boxes) else np.zeros(0)
        if len(overlaps) and overlaps.max() > threshold:
            j = int(overlaps.argmax())
            if difficult[j]:
                continue  # neither right nor wrong
            if not taken[image][j]:
                tp[n], taken[image][j] = 1, True
            else:
                fp[n] = 1  # a second detection of a taken object
        else:
            fp[n] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric) if npos else float("nan")


def voc_metrics(predictions, ground_truth, use_07_metric=True):
    """AP, AP50, AP75 in percent. predictions: {image: (boxes (k, 4) 0-based, scores (k,), labels
    (k,) 1-20)} as the detector gives them; ground_truth: {image: (labels 0-19, difficult, boxes as
    written)}. The detections go back to the written convention (+1 on xmin, ymin, as detectron2)."""
    per_class = {c: [] for c in range(len(CLASSES))}
    for image, (boxes, scores, labels) in predictions.items():
        for b, s, l in zip(np.asarray(boxes, float), np.asarray(scores, float), np.asarray(labels, int)):
            per_class[l - 1].append((image, float(s), [b[0] + 1, b[1] + 1, b[2], b[3]]))
    present = [c for c in range(len(CLASSES)) if any((l == c).any() for l, _, _ in ground_truth.values())]
    aps = {t: np.mean([class_ap(per_class[c], ground_truth, c, t / 100, use_07_metric) for c in present]) * 100
           for t in range(50, 100, 5)}
    return {"box_AP": float(np.mean(list(aps.values()))), "box_AP50": float(aps[50]), "box_AP75": float(aps[75])}
