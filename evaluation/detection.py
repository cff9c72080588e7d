"""Detection and instance segmentation for eval_dense.py (--task detect | instance).

The papers' headline results are COCO detection with Mask R-CNN R50-FPN 1x in detectron2 (MCL,
DeCon, SlotCon, DenseCL) and, for MoCo and DenseCL, PASCAL VOC07+12 detection with Faster R-CNN
R50-C4. These are those protocols in plain torchvision, so that no detectron2 build is needed:

    python eval_dense.py --init runs/mcl --task instance --init-decoder                 # synthetic scenes
    torchrun --nproc_per_node=8 eval_dense.py --init runs/densecl --task instance --data coco   # the 1x schedule
    torchrun --nproc_per_node=8 eval_dense.py --init runs/moco --task detect --data voc         # VOC07+12, R50-C4

FPN (--detector fpn; COCO and the synthetic scenes): torchvision's MaskRCNN (--task instance) or
FasterRCNN (--task detect) on the pre-trained ResNet with an FPN (P2-P6), BatchNorm in backbone,
FPN and heads (SyncBN under torchrun on CUDA, as the papers' configs), the 4conv1fc box head (MCL's
and DeCon's configs; detectron2's FastRCNNConvFCHead NUM_CONV 4 NUM_FC 1) and the 4-conv mask head.
--init-decoder starts the FPN from a pre-trained DeCon or MCL decoder and, for MCL, the box head's
four convs from its region head. Schedule for --data coco (the 1x): 90k iterations at batch 16, SGD
lr 0.02, momentum 0.9, weight decay 1e-4 (none on norm layers), linear warm-up over 1000 iterations
from lr/1000, x0.1 at 60k and 80k; multi-scale training (short side 640-800 by 32, long side <=
1333), test at 800; flips.

C4 (--detector c4, the default with --data voc): MoCo's detectron2 config pascal_voc_R_50_C4_24k_moco
(build_c4): res2-res4 as the backbone, the pre-trained res5 as the box head on 14 x 14 RoIs
(ROIAlignV2) with MoCo's extra BatchNorm after it, every BatchNorm trained (SyncBN under torchrun);
VOC2007+2012 trainval, tested on VOC2007 test; 24k iterations at batch 16, lr 0.02, warm-up 100, x0.1
at 18k and 22k; short side 480-800 by 32 in training, 800 in testing. Metric: VOC's (evaluation/voc.py).

Metrics: COCO AP, AP50, AP75 for boxes (and masks) with pycocotools (an optional dependency of
these tasks: `pip install pycocotools`), on COCO val2017 or on the synthetic scenes as instances
(every object its visible mask and box after occlusion; classes as in the segmentation task); on
VOC, VOC's AP, AP50 and AP75 (11-point, as detectron2's PascalVOCDetectionEvaluator for 2007).
Pictures: predictions (boxes, masks, class names, score > 0.5) on the first validation images.

As detectron2: ROIAlignV2 poolers (MultiScaleRoIAlignV2, RoIAlignV2), its predictor inits, its
warm-up (factor 0.001 at iteration 0), one test image per process, C4 never padded; fp32 by default,
and under --amp bf16 / fp16 autocast on the networks only (autocast_networks: every box operation in
fp32). Deviations from detectron2's configs (docs/downstream.md gives each one's expected effect):
torchvision's smooth-L1 box losses with beta 1/9 where detectron2 uses L1, and its loss
normalisation; tensor resizing where detectron2 resizes with PIL; no precise BN recomputation before
testing (MoCo's C4 config runs 200 iterations of it); SyncBN where MoCo's C4 config uses naiveSyncBN
(DenseCL's: SyncBN).
"""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import MultiScaleRoIAlign, roi_align

import common
from evaluation import voc, weights



def require_pycocotools():
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise SystemExit("--task detect / instance needs pycocotools for COCO AP: pip install pycocotools") from None


# =================================================================================================
# Data: COCO instances and the synthetic scenes as instances
# =================================================================================================
def flip_target(img, target):
    img = img.flip(-1)
    w = img.shape[-1]
    target = dict(target, boxes=target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0]))
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return img, target


class SyntheticInstances(Dataset):
    """The synthetic scenes as instances: each object's visible mask (occlusion applied), its box and
    class (1-8; 0 is background). Objects with fewer than `min_area` visible pixels are dropped."""

    def __init__(self, length, size, seed, split, train, min_area=16, style="colour"):
        self.length, self.size, self.seed, self.train, self.min_area = length, size, seed, train, min_area
        self.style = style
        self.offset = 0 if split == "train" else common.VAL_INDEX_OFFSET

    def __len__(self):
        return self.length

    def annotations(self, i):
        """(image, boxes (N, 4) xyxy, labels (N,), masks (N, H, W) uint8)."""
        img, label, inst = common.synthetic_scene(self.offset + i, self.seed, self.size, instances=True,
                                                     style=self.style)
        boxes, labels, masks = [], [], []
        for k in np.unique(inst[inst > 0]):
            m = inst == k
            if m.sum() < self.min_area:
                continue
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(int(label[m][0]))
            masks.append(m)
        return (img, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
                torch.from_numpy(np.stack(masks) if masks else np.zeros((0, self.size, self.size), bool)).to(torch.uint8))

    def __getitem__(self, i):
        img, boxes, labels, masks = self.annotations(i)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": i}
        if self.train and np.random.rand() < 0.5:
            x, target = flip_target(x, target)
        return x, target


class CocoInstances(Dataset):
    """COCO's instances_{split}2017.json: boxes (xywh -> xyxy), the 80 categories as 1-80, masks
    from polygons or RLE; crowd boxes left out of training (evaluation ignores them), as detectron2.
    Training and evaluation see the same annotations: a box without area (width or height <= 0) and
    an image whose file is missing are left out of both, with one warning each; an unreadable image
    is skipped with one warning (training reads the next, evaluation leaves its id out); a category
    id that `categories` lacks stops with the file and the annotation named."""

    def __init__(self, root, split, train, with_masks):
        from pycocotools.coco import COCO
        ann = Path(root) / "coco" / "annotations" / f"instances_{split}2017.json"
        if not ann.exists():
            raise SystemExit(f"--data coco: {ann} not found; expected coco/{{train2017,val2017}} and "
                             f"coco/annotations/instances_{{train,val}}2017.json below --data-root")
        self.coco, self.folder = COCO(str(ann)), Path(root) / "coco" / f"{split}2017"
        self.cat_ids = sorted(self.coco.getCatIds())
        self.clean(ann)
        self.ids = sorted(self.coco.getImgIds())
        if train:  # images without a usable object teach nothing (detectron2 drops them too)
            self.ids = [i for i in self.ids if any(not a["iscrowd"] for a in self.coco.loadAnns(self.coco.getAnnIds(i)))]
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.train, self.with_masks = train, with_masks
        self.warn_once = common.WarnOnce()

    def clean(self, ann):
        """Check the annotations against `categories` and the image files; drop boxes without area and
        images without a file (and their annotations), so training and evaluation see the same."""
        data, known = self.coco.dataset, set(self.cat_ids)
        for a in data.get("annotations", []):
            if a["category_id"] not in known:
                raise SystemExit(f"{ann}: annotation {a['id']} (image {a['image_id']}) has category_id "
                                 f"{a['category_id']}, which its 'categories' lack ({sorted(known)[:10]}...): fix the "
                                 f"file (or add the category)")
        empty = [a["id"] for a in data.get("annotations", []) if a["bbox"][2] <= 0 or a["bbox"][3] <= 0]
        missing = {im["id"]: im["file_name"] for im in data.get("images", []) if not (self.folder / im["file_name"]).is_file()}
        if empty:
            warnings.warn(f"{ann}: {len(empty)} box(es) without area (width or height <= 0; annotation ids "
                          f"{empty[:5]}{' ...' if len(empty) > 5 else ''}) left out of training and evaluation")
        if missing:
            warnings.warn(f"{ann}: {len(missing)} image file(s) missing below {self.folder} (e.g. "
                          f"{next(iter(missing.values()))}): left out of training and evaluation")
        if empty or missing:
            drop = set(empty)
            data["annotations"] = [a for a in data["annotations"] if a["id"] not in drop and a["image_id"] not in missing]
            data["images"] = [im for im in data["images"] if im["id"] not in missing]
            self.coco.createIndex()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        for attempt in range(len(self.ids)):  # an unreadable image: one warning, then the next (training)
            info = self.coco.loadImgs(self.ids[(i + attempt) % len(self.ids)])[0]
            path = self.folder / info["file_name"]
            try:
                img = common.open_rgb(path)
                break
            except Exception as e:
                self.warn_once(str(path), f"skipping unreadable image {path}: {type(e).__name__}: {e}")
                if not self.train:  # evaluation: no prediction for it, and its id left out of the AP
                    return None, {"image_id": info["id"]}
        else:
            raise SystemExit(f"--data coco: no image of {self.folder} can be read")
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(info["id"])) if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": info["id"]}
        if self.with_masks:
            target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]) if anns else
                                               np.zeros((0, info["height"], info["width"]), np.uint8))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        if self.train and np.random.rand() < 0.5:
            x, target = flip_target(x, target)
        return x, target


def coco_ground_truth(dataset, names):
    """A pycocotools COCO object for the validation set (the file itself for COCO)."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    if isinstance(dataset, CocoInstances):
        return dataset.coco
    images, anns = [], []
    for i in range(len(dataset)):
        img, boxes, labels, masks = dataset.annotations(i)
        images.append({"id": i, "width": img.width, "height": img.height})
        for b, l, m in zip(boxes.tolist(), labels.tolist(), masks.numpy()):
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": l, "iscrowd": 0, "area": float(m.sum()),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": rle})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    gt.createIndex()
    return gt


def collate(batch):
    return tuple(zip(*batch))


def build_data(args, device):
    """Training loader, validation loader, number of classes (with background), class names."""
    with_masks = args.task == "instance"
    if args.data == "voc":  # VOC07+12 trainval -> VOC07 test (evaluation/voc.py)
        train, val, names = voc.VocDetection(args.data_root, voc.TRAIN_SETS, True), None, list(voc.CLASSES)
        val = voc.VocDetection(args.data_root, voc.TEST_SETS, False)
    elif args.data == "coco":
        train = CocoInstances(args.data_root, "train", True, with_masks)
        val = CocoInstances(args.data_root, "val", False, with_masks)
        names = [c["name"] for c in train.coco.loadCats(train.cat_ids)]
    elif args.data == "synthetic":
        scenes = dict(size=args.synthetic_size, seed=args.seed, style=args.synthetic_style)
        train = SyntheticInstances(args.synthetic_train, split="train", train=True, **scenes)
        val = SyntheticInstances(args.synthetic_val, split="val", train=False, **scenes)
        names = list(common.SYNTHETIC_CLASSES[1:])
    else:
        raise SystemExit(f"--task {args.task}: --data coco, voc or synthetic (got {args.data})")
    train_loader = common.make_loader(train, args.batch_per_rank, args.workers, args.seed, device, collate)
    rank = dist.get_rank() if dist.is_initialized() else 0
    val_sampler = list(range(rank, len(val), common.world_size())) if common.world_size() > 1 else None
    val_loader = DataLoader(val, batch_size=1, sampler=val_sampler,  # detectron2 tests one image per GPU
                            num_workers=args.workers, collate_fn=collate)
    return train_loader, val_loader, len(names) + 1, names


# =================================================================================================
# Model: R-CNN on the pre-trained ResNet, FPN and heads with BatchNorm
# =================================================================================================
def build_model(args, arch, num_classes, backbone_state, meta):
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    trunk = common.ResNetTrunk(arch)
    if backbone_state is not None:
        weights.load_backbone(trunk, backbone_state, arch, meta, args.init)
    body = BackboneWithFPN(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)}, trunk.channels, 256,
                           extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    box_head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)  # 4conv1fc
    for fc in (m for m in box_head.modules() if isinstance(m, nn.Linear)):  # detectron2's c2_xavier_fill
        nn.init.kaiming_uniform_(fc.weight, a=1), nn.init.zeros_(fc.bias)
    kw = dict(box_head=box_head, box_predictor=box_predictor(1024, num_classes), min_size=args.train_sizes,
              max_size=args.max_size, image_mean=common.IMAGENET_MEAN, image_std=common.IMAGENET_STD,
              box_roi_pool=MultiScaleRoIAlignV2(["0", "1", "2", "3"], 7),
              rpn_post_nms_top_n_train=args.proposals, rpn_post_nms_top_n_test=args.proposals,
              box_batch_size_per_image=args.rois_per_image)
    if args.task == "instance":
        mask_predictor = MaskRCNNPredictor(256, 256, num_classes)
        nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)  # detectron2's mask predictor
        nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)
        model = MaskRCNN(body, mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
                         mask_roi_pool=MultiScaleRoIAlignV2(["0", "1", "2", "3"], 14), mask_predictor=mask_predictor, **kw)
    else:
        model = FasterRCNN(body, **kw)
    if args.init_decoder:
        load_decoder(model, meta)
    return model


def box_predictor(channels, num_classes):
    """torchvision's FastRCNNPredictor with detectron2's init: classifier N(0, 0.01), class-specific
    box regression N(0, 0.001), biases 0."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    predictor = FastRCNNPredictor(channels, num_classes)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias), nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


class MultiScaleRoIAlignV2(MultiScaleRoIAlign):
    """detectron2's ROIPooler with ROIAlignV2 over P2-P5 (Base-RCNN-FPN: POOLER_TYPE ROIAlignV2,
    sampling ratio 0): a box of side sqrt(area) goes to level floor(4 + log2(side / 224 + 1e-8))
    clamped to P2-P5, pooled with aligned=True (half-pixel offsets) and adaptive sampling, where
    torchvision's MultiScaleRoIAlign pools with aligned=False and 2 samples per bin."""

    def __init__(self, featmap_names, size):
        super().__init__(featmap_names, size, sampling_ratio=0)

    def forward(self, features, proposals, image_shapes):  # {"0".."3": (B, C, H/4..H/32, ...)} -> (R, C, s, s)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(proposals)])  # (R, 5)
        side = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()  # (R,)
        level = (torch.floor(4 + torch.log2(side / 224 + 1e-8)).clamp(2, 5) - 2).long()  # (R,) P2 -> 0
        maps = [features[n] for n in self.featmap_names]
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], *self.output_size)
        for i, fmap in enumerate(maps):
            idx = (level == i).nonzero().squeeze(1)
            out[idx] = roi_align(fmap, rois[idx], self.output_size, 1 / 2 ** (i + 2), sampling_ratio=0,
                                 aligned=True).to(out.dtype)
        return out


class RoIAlignV2(MultiScaleRoIAlign):
    """detectron2's ROIAlignV2 pooler on one feature map: roi_align with aligned=True (half-pixel
    offsets; torchvision's MultiScaleRoIAlign uses aligned=False), adaptive sampling (ratio 0), the
    map's known scale."""

    def __init__(self, size, scale):
        super().__init__(["0"], size, sampling_ratio=0)
        self.size, self.scale = size, scale

    def forward(self, features, proposals, image_shapes):  # features {"0": (B, C, H, W)} -> (R, C, size, size)
        return roi_align(features["0"], proposals, self.size, self.scale, sampling_ratio=0, aligned=True)


class Res5Head(nn.Module):
    """detectron2's Res5ROIHeads box head, with MoCo's extra BatchNorm after res5: the pre-trained
    res5 stage (its first block strides 2: 14 x 14 RoIs -> 7 x 7) on each RoI, a BatchNorm
    (Res5ROIHeadsExtraNorm), then the mean over the 7 x 7: (R, 2048)."""

    def __init__(self, res5, channels):
        super().__init__()
        self.res5, self.norm = res5, nn.BatchNorm2d(channels)

    def forward(self, x):  # (R, 1024, 14, 14)
        return self.norm(self.res5(x)).mean((2, 3))  # (R, 2048)


def build_c4(args, arch, num_classes, backbone_state, meta):
    """Faster R-CNN R50-C4 as MoCo's detectron2 config (pascal_voc_R_50_C4_24k_moco.yaml): the
    backbone is the stem and res2-res4 (stride 16, 1024 channels), the RPN on it (anchors 32-512,
    aspect ratios 0.5 / 1 / 2; 12000 / 2000 proposals before / after NMS in training, 6000 / 1000 in
    testing), RoIs pooled to 14 x 14 (ROIAlignV2), res5 as the box head (Res5Head), a linear
    classifier and class-specific box regression initialised N(0, 0.01) and N(0, 0.001); 512 RoIs
    per image, a quarter positive. Every BatchNorm trains (FREEZE_AT 0; SyncBN under torchrun)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead
    trunk = common.ResNetTrunk(arch)
    if backbone_state is not None:
        weights.load_backbone(trunk, backbone_state, arch, meta, args.init)
    body = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3)
    body.out_channels = trunk.channels[2]  # res4: 1024 for ResNet-50
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    return FasterRCNN(body, num_classes=None, rpn_anchor_generator=anchors, rpn_head=RPNHead(body.out_channels, 15),
                      box_roi_pool=RoIAlignV2(14, 1 / 16), box_head=Res5Head(trunk.layer4, trunk.channels[3]),
                      box_predictor=box_predictor(trunk.channels[3], num_classes), min_size=args.train_sizes,
                      max_size=args.max_size, size_divisible=1,  # C4 has no size divisibility (detectron2: 0)
                      image_mean=common.IMAGENET_MEAN, image_std=common.IMAGENET_STD,
                      rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
                      rpn_post_nms_top_n_train=args.proposals, rpn_post_nms_top_n_test=min(args.proposals, 1000),
                      box_batch_size_per_image=args.rois_per_image, box_score_thresh=0.05, box_nms_thresh=0.5,
                      box_detections_per_img=100)


def autocast_networks(model, device, dtype):
    """--amp bf16 / fp16: autocast where the networks compute (backbone and FPN, the RPN's conv head,
    the box and mask heads and predictors), their outputs back in fp32. Every box operation (anchor
    decoding, proposal NMS, RoI sampling and regression targets, RoI pooling, the losses, per-class
    NMS and post-processing) then runs in fp32, as in detectron2, which trains these protocols in
    fp32. (One autocast over the whole R-CNN runs torchvision's box code in bf16: NMS's per-class
    offset, label x (max + 1), then rounds boxes to a 64-128 px grid for VOC's later classes.)"""
    if dtype is None:
        return model
    heads = model.roi_heads
    for net in (model.backbone, model.rpn.head, heads.box_head, heads.box_predictor,
                getattr(heads, "mask_head", None), getattr(heads, "mask_predictor", None)):
        if net is not None:
            net.forward = in_autocast(net.forward, device, dtype)
    return model


def in_autocast(forward, device, dtype):
    """forward run under autocast, its floating-point outputs (tensors, or lists, tuples and dicts of
    them) returned in fp32."""
    def to_fp32(out):
        if torch.is_tensor(out):
            return out.float() if out.is_floating_point() else out
        if isinstance(out, dict):
            return type(out)((k, to_fp32(v)) for k, v in out.items())
        if isinstance(out, (list, tuple)):
            return type(out)(to_fp32(v) for v in out)
        return out

    def run(*args, **kwargs):
        with common.autocast(device, dtype):
            return to_fp32(forward(*args, **kwargs))
    return run


def load_decoder(model, meta):
    """The pre-trained FPN (common.FPN names) into torchvision's FPN, and MCL's region-head convs
    (mcl.RegionHead.convs names: 3i conv, 3i+1 BN) into the box head's four convs."""
    if meta.get("decoder") is None or (meta.get("decoder_cfg") or {}).get("type", "fpn") != "fpn":
        raise ValueError(f"--init-decoder: the checkpoint holds no pre-trained FPN decoder (method {meta.get('method')})")
    fpn, loaded = {}, []
    for k, v in meta["decoder"].items():
        parts = k.split(".")  # lateral.i.{0,1}.x or output.pN.{0,1}.x
        block = "inner_blocks" if parts[0] == "lateral" else "layer_blocks"
        index = parts[1] if parts[0] == "lateral" else str(int(parts[1][1:]) - 2)
        fpn[".".join([block, index, *parts[2:]])] = v
        loaded.append(f"{block}.{index}")
    missing, unexpected = model.backbone.fpn.load_state_dict(fpn, strict=False)
    if unexpected:
        raise ValueError(f"--init-decoder: decoder tensors with no place in the FPN: {unexpected[:4]}")
    common.print0(f"--init-decoder: FPN blocks {sorted(set(loaded))} from the pre-trained decoder")
    convs = meta.get("region_head_convs")
    if convs:
        head = {f"{int(k.split('.')[0]) // 3}.{int(k.split('.')[0]) % 3}.{k.split('.', 1)[1]}": v for k, v in convs.items()}
        model.roi_heads.box_head.load_state_dict(head, strict=False)
        common.print0("--init-decoder: the box head's four convs from MCL's region head")


# =================================================================================================
# Evaluation: COCO AP, pictures
# =================================================================================================
@torch.no_grad()
def evaluate(model, loader, gt, names, args, device, out):
    """COCO AP / AP50 / AP75 for boxes (and masks) over the validation set, gathered to rank 0."""
    from pycocotools import mask as mask_util
    from pycocotools.cocoeval import COCOeval
    model.eval()
    label_to_cat = (loader.dataset.cat_ids if isinstance(loader.dataset, CocoInstances) else list(range(1, len(names) + 1)))
    results, pictures = [], []
    evaluated = []  # the image ids predicted: an unreadable one (None) is left out of the AP
    for images, targets in common.progress(loader, 0, 1):
        kept = [(x, t) for x, t in zip(images, targets) if x is not None]
        if not kept:
            continue
        images, targets = zip(*kept)
        evaluated += [int(t["image_id"]) for t in targets]
        outputs = model([x.to(device) for x in images])
        for x, t, o in zip(images, targets, outputs):
            o = {k: v.float().cpu() for k, v in o.items()}
            for j in range(len(o["boxes"])):
                b = o["boxes"][j].tolist()
                r = {"image_id": int(t["image_id"]), "category_id": label_to_cat[int(o["labels"][j]) - 1],
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(o["scores"][j])}
                if "masks" in o:
                    rle = mask_util.encode(np.asfortranarray((o["masks"][j, 0] > 0.5).numpy().astype(np.uint8)))
                    r["segmentation"] = dict(rle, counts=rle["counts"].decode())
                results.append(r)
            if len(pictures) < args.pictures:
                pictures.append((x, o))
    if common.world_size() > 1:
        gathered = [None] * common.world_size()
        dist.all_gather_object(gathered, (results, evaluated))
        results, evaluated = [r for part, _ in gathered for r in part], [i for _, ids in gathered for i in ids]
    model.train()
    if not common.is_main():
        return None
    metrics = {}
    if not gt.getAnnIds(imgIds=sorted(set(evaluated)), iscrowd=False):  # COCO's -1: no AP is defined, not AP 0
        print(f"no ground-truth object in the {len(set(evaluated))} validation images (an annotation file without "
              f"annotations?): AP is not defined, recorded as null")
        return {f"{name}_{m}": None for name in (("box", "mask") if args.task == "instance" else ("box",))
                for m in ("AP", "AP50", "AP75")}
    for kind in ("bbox", "segm") if args.task == "instance" else ("bbox",):
        name = "box" if kind == "bbox" else "mask"
        if not results:  # nothing detected: AP 0 (pycocotools refuses an empty result list)
            metrics.update({f"{name}_AP": 0.0, f"{name}_AP50": 0.0, f"{name}_AP75": 0.0})
            continue
        ev = COCOeval(gt, gt.loadRes(results), kind)
        ev.params.imgIds = sorted(set(evaluated))
        ev.evaluate(), ev.accumulate(), ev.summarize()
        metrics.update({f"{name}_AP": float(ev.stats[0]) * 100, f"{name}_AP50": float(ev.stats[1]) * 100,
                        f"{name}_AP75": float(ev.stats[2]) * 100})
    if pictures:
        save_pictures(pictures, names, out / "predictions.png")
    return metrics


@torch.no_grad()
def evaluate_voc(model, loader, names, args, device, out):
    """VOC's AP, AP50, AP75 (evaluation/voc.py) over the test set, the predictions gathered to rank 0."""
    model.eval()
    predictions, pictures = {}, []
    for images, targets in common.progress(loader, 0, 1):
        outputs = model([x.to(device) for x in images])
        for x, t, o in zip(images, targets, outputs):
            o = {k: v.float().cpu() for k, v in o.items()}
            predictions[int(t["image_id"])] = (o["boxes"].numpy(), o["scores"].numpy(), o["labels"].numpy())
            if len(pictures) < args.pictures:
                pictures.append((x, o))
    if common.world_size() > 1:
        gathered = [None] * common.world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = {k: v for part in gathered for k, v in part.items()}
    model.train()
    if not common.is_main():
        return None
    data = loader.dataset
    metrics = voc.voc_metrics(predictions, {i: data.ground_truth(i) for i in range(len(data))})
    if pictures:
        save_pictures(pictures, names, out / "predictions.png")
    return metrics


def save_pictures(pictures, names, path, threshold=0.5):
    """One row of images: predicted masks, boxes and class names with score > threshold."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    tiles = []
    for x, o in pictures:
        img = (x * 255).to(torch.uint8)
        keep = o["scores"] > threshold
        if "masks" in o and keep.any():
            img = draw_segmentation_masks(img, o["masks"][keep, 0] > 0.5, alpha=0.45)
        if keep.any():
            img = draw_bounding_boxes(img, o["boxes"][keep], [f"{names[int(l) - 1]} {s:.2f}" for l, s in
                                                              zip(o["labels"][keep], o["scores"][keep])], colors="yellow")
        tiles.append(Image.fromarray(img.permute(1, 2, 0).numpy()))
    h = max(t.height for t in tiles)
    grid = Image.new("RGB", (sum(t.width for t in tiles), h), "white")
    left = 0
    for t in tiles:
        grid.paste(t, (left, 0))
        left += t.width
    grid.save(path)


# =================================================================================================
# Train and run
# =================================================================================================
def lr_at(step, args):
    """Linear warm-up from lr/1000 at iteration 0 to lr at --warmup (detectron2's WarmupMultiStepLR:
    factor 0.001 (1 - a) + a, a = iteration / warm-up), then x0.1 at each of args.steps."""
    warm = min(1.0, step / args.warmup) if args.warmup else 1.0
    return args.lr * (0.001 + 0.999 * warm) * 0.1 ** sum(step >= s for s in args.steps)


def run(args):
    if args.data != "voc":  # COCO AP
        require_pycocotools()
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out = common.prepare_output(args, Path(__file__).resolve().parents[1] / "eval_dense.py")
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)
    backbone_state, meta = weights.load_init(args.init)
    arch = args.arch or meta.get("arch") or "resnet50"
    if arch.startswith("vit"):
        raise SystemExit("--task detect / instance: ResNet backbones only (a ViT needs a ViTDet-style detector)")
    train_loader, val_loader, num_classes, names = build_data(args, device)
    build = build_c4 if args.detector == "c4" else build_model
    model = build(args, arch, num_classes, backbone_state, meta).to(device)
    model = common.sync_batchnorm(model, True)  # SyncBN in backbone, FPN and heads under torchrun on CUDA
    model = autocast_networks(model, device, dtype)  # --amp bf16 / fp16: the networks only, boxes in fp32
    common.seed_everything(args.seed + rank)  # the same weights on every rank; from here each samples its own RoIs
    common.print0(f"eval_dense | {args.task} ({args.detector.upper()}) | init {args.init} ({meta.get('method')}, {arch}) | {args.data}: "
                  f"{num_classes - 1} classes, {len(train_loader.dataset)} train / {len(val_loader.dataset)} val | "
                  f"{args.iters} iters, batch {args.batch_size}, lr {args.lr:g}, steps {list(args.steps)} | device {device}")
    norms = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in norms)]
    optimizer = torch.optim.SGD([{"params": others}, {"params": norms, "weight_decay": 0.0}],  # detectron2's
                                lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)  # WEIGHT_DECAY_NORM 0
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ckpt_path = out / "checkpoint.pth"
    step, _ = common.resume(ckpt_path, {"model": model}, optimizer, scaler, device, args, log)
    running = torch.zeros((), device=device)
    save = lambda: common.save_checkpoint(ckpt_path, {"model": model}, optimizer, scaler, step, args, losses=running)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    tick, tick_step = time.time(), step
    common.catch_stop_signals()
    steps_per_epoch = len(train_loader)  # before a mid-epoch resume shortens the sampler
    epoch, epochs = step // steps_per_epoch, -(-args.iters // steps_per_epoch)
    while step < args.iters:
        train_loader.sampler.set_epoch(epoch)
        train_loader.sampler.skip = (step - epoch * steps_per_epoch) * args.batch_per_rank
        bar = common.progress(train_loader, epoch, epochs)
        for images, targets in bar:
            if step >= args.iters:
                break
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, args)
            images = [x.to(device, non_blocking=True) for x in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            losses = net(images, targets)  # rpn objectness / box, roi classifier / box (/ mask), in fp32
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach()
            step += 1
            stop = common.stop_requested()
            if step % args.log_every == 0 or step == args.iters or stop:
                common.check_finite(running, {"model": model}, step, ckpt_path)
                mean = common.mean_over_ranks(running).item() / (step - tick_step)
                speed = (step - tick_step) * args.batch_size / (time.time() - tick)
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr_at(step - 1, args):.4f}", img_s=f"{speed:.1f}")
                log.write(step=step, loss=mean, lr=lr_at(step - 1, args), images_per_s=speed,
                          **{k: float(v) for k, v in losses.items()})
                running.zero_()
                tick, tick_step = time.time(), step
            if step % args.save_every == 0 or stop:
                save()
            if stop:
                common.exit_on_signal(stop, step, ckpt_path)
        train_loader.sampler.skip = 0
        epoch += 1
    save()
    model.transform.min_size = (args.test_size,)  # single-scale testing
    if args.data == "voc":
        metrics = evaluate_voc(model, val_loader, names, args, device, out)
    else:
        gt = coco_ground_truth(val_loader.dataset, names) if common.is_main() else None
        metrics = evaluate(model, val_loader, gt, names, args, device, out)
    if common.is_main():
        metrics.update(task=args.task, init=args.init, method=meta.get("method"), arch=arch, data=args.data,
                       iters=args.iters, init_decoder=args.init_decoder)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
        print("\n| metric | value |\n|---|---|")
        for k in [k for k in metrics if "AP" in k]:
            print(f"| {k} | {'-' if metrics[k] is None else f'{metrics[k]:.2f}'} |")
        print(f"\n-> {out / 'metrics.json'}" + (f", {out / 'predictions.png'}" if args.pictures else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics
