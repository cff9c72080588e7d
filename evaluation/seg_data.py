"""Segmentation data for eval_dense.py: the VOC, Cityscapes, ADE20K and synthetic layouts, the
protocols' training augmentation (random scale, class-balanced crop, flip, photometric distortion)
and test-time resize, and the validation batches (lists: no padding). eval_dense.py's docstring and docs/downstream.md
say which protocol each dataset follows and where this deviates from it."""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import common

CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IGNORE = 255
# The protocol of each --protocol and --data: the mmsegmentation configs each repository runs, read
# from them. Flags left unset take these values. The first group is the data: the crop; the training
# scale, base_size (None: the crop's side) x U(--scale-range 0.5 2); crops re-drawn while one class
# covers more than cat_max; the photometric distortion; the test resize or sliding windows; logits
# resized with align_corners; the input normalisation. The second is the fine-tuning: iterations,
# global batch, SGD lr with x0.1 steps (fractions of the iterations: 21k / 27k of 30k and 63k / 81k
# of 90k are 70% and 90%) or poly 0.9 down to min_lr, weight decay, output stride, FCN head,
# auxiliary head weight. The probe (--task probe) takes the data group only.
SLOTCON_ADE20K = dict(  # SlotCon's README: ade20k/fcn_r50-d8_512x512_80k_ade20k.py (4 GPUs x 4)
    crop_size=512, base_size=None, cat_max=0.75, photometric="on", val_resize=[512, 2048], slide=None,
    align_corners="off", input_norm="imagenet",
    iters=80000, batch_size=16, lr=0.01, steps=None, min_lr=1e-4, weight_decay=5e-4, output_stride=8, fcn_head="d8",
    aux_weight=0.4)
PROTOCOLS = {
    "slotcon": {  # CVMI-Lab/SlotCon's README, transfer/segmentation: the DeCon and SlotCon papers' tables
        "voc": dict(  # voc12aug/fcn_d6_r50-d16_513x513_30k_voc12aug_moco.py (2 GPUs x 8)
            crop_size=513, base_size=None, cat_max=1.0, photometric="off", val_resize=[513, 2049], slide=None,
            align_corners="on", input_norm="moco-configs",
            iters=30000, batch_size=16, lr=0.003, steps=[0.7, 0.9], min_lr=0.0, weight_decay=1e-4,
            output_stride=16, fcn_head="d6", aux_weight=0.0),
        "cityscapes": dict(  # cityscapes/fcn_d6_r50-d16_769x769_90k_cityscapes_moco.py (2 GPUs x 8)
            crop_size=769, base_size=1024, cat_max=1.0, photometric="off", val_resize=None, slide=[769, 513],
            align_corners="on", input_norm="moco-configs",
            iters=90000, batch_size=16, lr=0.01, steps=[0.7, 0.9], min_lr=0.0, weight_decay=1e-4,
            output_stride=16, fcn_head="d6", aux_weight=0.0),
        "ade20k": SLOTCON_ADE20K,
    },
    "densecl": {  # WXinlong/mmsegmentation (DenseCL's fork), configs/densecl: the DenseCL paper's tables
        "voc": dict(  # fcn_r50-d8_512x512_20k_voc12aug.py (4 per GPU; the GPU count is not in the config)
            crop_size=512, base_size=None, cat_max=0.75, photometric="on", val_resize=[512, 2048], slide=None,
            align_corners="off", input_norm="imagenet",
            iters=20000, batch_size=16, lr=0.01, steps=None, min_lr=1e-4, weight_decay=5e-4, output_stride=8,
            fcn_head="d8", aux_weight=0.4),
        "cityscapes": dict(  # fcn_r50-d8_769x769_40k_cityscapes.py (4 GPUs x 2)
            crop_size=769, base_size=1024, cat_max=0.75, photometric="on", val_resize=None, slide=[769, 513],
            align_corners="on", input_norm="imagenet",
            iters=40000, batch_size=8, lr=0.01, steps=None, min_lr=1e-4, weight_decay=5e-4, output_stride=8,
            fcn_head="d8", aux_weight=0.4),
        "ade20k": SLOTCON_ADE20K,  # the fork has no ADE20K config: mmsegmentation's own, as SlotCon runs it
    },
}
SYNTHETIC = dict(  # this project's: plain crops (the scenes' colours are random), a short schedule
    crop_size=224, base_size=None, cat_max=1.0, photometric="off", val_resize=None, slide=None, align_corners="off",
    input_norm="imagenet",
    iters=2000, batch_size=16, lr=0.01, steps=None, min_lr=0.0, weight_decay=5e-4, output_stride=16, fcn_head="d8",
    aux_weight=0.4)
DATA_KEYS = ("crop_size", "base_size", "cat_max", "photometric", "val_resize", "slide", "align_corners", "input_norm")
PROBE = dict(iters=2000, batch_size=16, lr=0.01, steps=None, min_lr=0.0, weight_decay=0.0, output_stride=16,
             fcn_head="d8", aux_weight=0.4)  # the dense linear probe's training, on every dataset


def protocol(args):
    """The defaults of --protocol for --data and --task (see PROTOCOLS). The probe's frozen network
    sees its inputs normalised as in pre-training (a frozen BatchNorm cannot absorb the moco-configs
    scale)."""
    table = SYNTHETIC if args.data == "synthetic" else PROTOCOLS[args.protocol][args.data]
    if args.task == "probe":
        return {**{k: table[k] for k in DATA_KEYS}, **PROBE, "input_norm": "imagenet"}
    return dict(table)


def cityscapes_lut():
    """labelIds -> train ids (19 classes), everything else ignored."""
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def ade20k_lut():
    """ADE20K: 0 (other) is ignored, classes 1..150 become 0..149."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE
    return np.clip(lut, 0, 255).astype(np.uint8)


def voc_pairs(root, split):
    """VOC2012 segmentation (image, label) pairs as mmsegmentation's voc12aug config reads them: val
    is val.txt with the official labels (SegmentationClass); train is train.txt with the official
    labels plus the SBD images of an augmented list with theirs (SegmentationClassAug). The augmented
    list is mmsegmentation's aug.txt (SBD minus VOC train and val) or trainaug.txt (train plus SBD,
    minus val), or DeepLab's train_aug.txt (lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png");
    without one, train.txt alone. An image of train.txt keeps its official label in every case."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    lists, official, aug_labels = base / "ImageSets" / "Segmentation", base / "SegmentationClass", base / "SegmentationClassAug"
    layout = (f"{base}/JPEGImages/*.jpg, {official}/*.png and {lists}/{{train,val}}.txt; for VOC-aug also "
              f"{aug_labels}/*.png with {lists}/aug.txt (mmsegmentation's voc_aug.py) or train_aug.txt (DeepLab's)")
    ids_of = lambda name: [line.split()[0] for line in (lists / name).read_text().splitlines() if line.strip()]
    for need in (lists / "train.txt", lists / "val.txt", official):
        if not need.exists():
            raise SystemExit(f"--data voc: {need} missing. Expected layout: {layout}")
    train_ids, val_ids = ids_of("train.txt"), ids_of("val.txt")
    if split == "val":
        pairs, source = [(base / "JPEGImages" / f"{i}.jpg", official / f"{i}.png") for i in val_ids], "val.txt"
    else:
        pairs, source = [(base / "JPEGImages" / f"{i}.jpg", official / f"{i}.png") for i in train_ids], "train.txt"
        aug = next((lists / n for n in ("aug.txt", "trainaug.txt", "train_aug.txt") if (lists / n).exists()), None)
        if aug is not None and aug_labels.is_dir():
            taken = set(train_ids) | set(val_ids)  # train keeps its official labels; val never trains
            extra = []
            for line in aug.read_text().splitlines():
                words = line.split()
                if not words:
                    continue
                if len(words) == 2:  # DeepLab's: image and label paths, relative to VOC2012
                    image, label = (base / w.lstrip("/") for w in words)
                    image_id = image.stem
                else:
                    image_id = words[0]
                    image, label = base / "JPEGImages" / f"{image_id}.jpg", aug_labels / f"{image_id}.png"
                if image_id not in taken:
                    taken.add(image_id)
                    extra.append((image, label))
            pairs, source = pairs + extra, f"train.txt ({len(train_ids)}, SegmentationClass) + {aug.name} ({len(extra)}, SegmentationClassAug)"
        elif aug is not None:
            common.print0(f"--data voc: {aug} is there but {aug_labels} is not: training on train.txt alone")
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise SystemExit(f"--data voc {split}: {len(missing)} file(s) of {source} missing, e.g. {missing[0]}. Expected "
                         f"layout: {layout}")
    common.print0(f"--data voc {split}: {source}, {len(pairs)} images")
    return pairs


def seg_pairs(data, root, split):
    """(image path, label path) pairs, the class count and the label lookup table for a layout."""
    root = Path(root)
    if data == "voc":
        return voc_pairs(root, split), 21, None
    if data == "cityscapes":
        img_dir = root / "cityscapes" / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise SystemExit(f"--data cityscapes: {img_dir} missing. Expected layout: <data-root>/cityscapes/"
                             f"leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png and gtFine/{{train,val}}/<city>/"
                             f"*_gtFine_labelTrainIds.png (createTrainIdLabelImgs) or *_gtFine_labelIds.png")
        imgs = [Path(f) for f in common.find_images(img_dir) if f.endswith("_leftImg8bit.png")]  # city links followed
        lbl = lambda p, kind: Path(str(p).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", f"_gtFine_{kind}.png"))
        if imgs and all(lbl(p, "labelTrainIds").is_file() for p in imgs):  # createTrainIdLabelImgs' (mmsegmentation's)
            return [(p, lbl(p, "labelTrainIds")) for p in imgs], 19, None
        return [(p, lbl(p, "labelIds")) for p in imgs], 19, cityscapes_lut()  # the download's: ids -> train ids
    if data == "ade20k":
        sub = "training" if split == "train" else "validation"
        base = root / "ADEChallengeData2016"
        if not (base / "images" / sub).is_dir():
            raise SystemExit(f"--data ade20k: {base / 'images' / sub} missing. Expected layout: <data-root>/"
                             f"ADEChallengeData2016/{{images,annotations}}/{{training,validation}}/*.jpg|png")
        imgs = sorted((base / "images" / sub).glob("*.jpg"))
        return [(p, base / "annotations" / sub / (p.stem + ".png")) for p in imgs], 150, ade20k_lut()
    raise ValueError(data)


class SegFiles(Dataset):
    """Image/label file pairs with an optional label lookup table, then a joint transform."""

    def __init__(self, pairs, lut, transform):
        if not pairs:
            raise SystemExit("no image/label pairs found: check the layout in docs/downstream.md")
        self.pairs, self.lut, self.transform = pairs, lut, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, label_path = self.pairs[i]
        label = np.array(Image.open(label_path))  # palette PNGs read as class indices
        img = common.open_rgb(img_path)  # EXIF orientation applied, 16-bit scaled
        if img.size != label.shape[::-1]:  # labels follow the stored pixels: then so must the image
            img = common.open_rgb(img_path, exif=False)
        if self.lut is not None:
            label = self.lut[label]
        return self.transform(img, label)


def normalise(img, mode="imagenet"):
    """PIL image -> (3, H, W) float tensor. "imagenet": (x - mean) / std on [0, 1] pixels, as the
    pre-training. "moco-configs": the same mean and std applied to [0, 255] pixels, as SlotCon's
    *_moco dataset configs do (mmsegmentation normalises 0-255 pixels; those configs give the 0-1
    constants): inputs about 255 times larger, which the first BatchNorm absorbs."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / (1.0 if mode == "moco-configs" else 255.0)).permute(2, 0, 1)
    return (x - torch.tensor(common.IMAGENET_MEAN)[:, None, None]) / torch.tensor(common.IMAGENET_STD)[:, None, None]


def denormalise(x, mode="imagenet"):
    """normalise's inverse, to [0, 1] pixels (for the pictures)."""
    x = x * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    return x / 255.0 if mode == "moco-configs" else x


def photometric(img):
    """mmsegmentation's PhotoMetricDistortion on a PIL image, each part with probability 1/2:
    brightness +-32, contrast x0.5-1.5 (before or after the rest, at random), saturation x0.5-1.5,
    hue +-18 of OpenCV's 180 (PIL's HSV: +-25.5 of 256). Values clipped to 0-255."""
    x = np.asarray(img, dtype=np.float32)
    coin = lambda: np.random.randint(2)
    contrast = lambda x: x * np.random.uniform(0.5, 1.5) if coin() else x
    if coin():
        x = x + np.random.uniform(-32, 32)
    contrast_first = coin()
    x = contrast(x) if contrast_first else x
    hsv = np.asarray(Image.fromarray(x.clip(0, 255).astype(np.uint8)).convert("HSV"), dtype=np.float32)
    if coin():
        hsv[..., 1] *= np.random.uniform(0.5, 1.5)
    if coin():
        hsv[..., 0] = (hsv[..., 0] + np.random.uniform(-25.5, 25.5)) % 256
    x = np.asarray(Image.fromarray(hsv.clip(0, 255).astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    x = contrast(x) if not contrast_first else x
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))


class TrainTransform:
    """Scale the short side to base_size x U(scale_range), random crop (re-drawn up to 10 times while
    one class covers more than cat_max of it, as mmsegmentation's RandomCrop), flip, photometric
    distortion; padded with ignore to the crop."""

    def __init__(self, crop, scale_range=(0.5, 2.0), base_size=None, cat_max=1.0, distort=False, norm="imagenet"):
        self.crop, self.scale_range, self.base = crop, scale_range, base_size or crop
        self.cat_max, self.distort, self.norm = cat_max, distort, norm

    def __call__(self, img, label):
        scale = np.random.uniform(*self.scale_range) * self.base / min(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        y = torch.from_numpy(np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))).long()  # (h, w)
        for _ in range(10 if self.cat_max < 1 else 1):
            top, left = np.random.randint(0, max(h - self.crop, 0) + 1), np.random.randint(0, max(w - self.crop, 0) + 1)
            box = (left, top, min(left + self.crop, w), min(top + self.crop, h))
            counts = torch.bincount(y[box[1]:box[3], box[0]:box[2]].flatten(), minlength=256)[:IGNORE]
            if len(counts.nonzero()) > 1 and counts.max() / counts.sum() < self.cat_max:
                break
        img, y = img.crop(box), y[box[1]:box[3], box[0]:box[2]]
        if np.random.rand() < 0.5:
            img, y = img.transpose(Image.FLIP_LEFT_RIGHT), y.flip(-1)
        x = normalise(photometric(img) if self.distort else img, self.norm)  # (3, h', w')
        ph, pw = self.crop - x.shape[1], self.crop - x.shape[2]
        return F.pad(x, (0, pw, 0, ph)), F.pad(y, (0, pw, 0, ph), value=IGNORE)


def val_transform(img, label, norm="imagenet"):
    """Whole image, normalised; the label as is."""
    return normalise(img, norm), torch.from_numpy(np.asarray(label)).long()


class ValTransform:
    """The protocols' test input: the whole image, or scaled to fit (short, long) keeping its ratio
    (VOC: (512, 2048), mmsegmentation's img_scale); the label stays at its size, logits are resized
    to it."""

    def __init__(self, resize=None, norm="imagenet"):
        self.resize, self.norm = resize, norm

    def __call__(self, img, label):
        if self.resize:
            s = min(self.resize[0] / min(img.size), self.resize[1] / max(img.size))
            img = img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)
        return val_transform(img, label, self.norm)


def as_list(batch):
    """Validation batches stay lists of (image, label): every image is scored at its own size."""
    return batch


def build_data(args, device):
    """Training and validation loaders, the class count and the class names."""
    augment = TrainTransform(args.crop_size, args.scale_range, args.base_size, args.cat_max, args.photometric == "on",
                             args.input_norm)
    test_input = ValTransform(args.val_resize, args.input_norm)
    if args.data == "synthetic":
        train = common.SyntheticScenes(args.synthetic_train, args.synthetic_size, seed=args.seed, split="train",
                                       transform=augment, with_labels=True, style=args.synthetic_style)
        val = common.SyntheticScenes(args.synthetic_val, args.synthetic_size, seed=args.seed, split="val",
                                     transform=test_input, with_labels=True, style=args.synthetic_style)
        num_classes, names = len(common.SYNTHETIC_CLASSES), list(common.SYNTHETIC_CLASSES)
    else:
        pairs, num_classes, lut = seg_pairs(args.data, args.data_root, "train")
        val_pairs, _, _ = seg_pairs(args.data, args.data_root, "val")
        train, val = SegFiles(pairs, lut, augment), SegFiles(val_pairs, lut, test_input)
        names = [str(i) for i in range(num_classes)]
    train_loader = common.make_loader(train, args.batch_per_rank, args.workers, args.seed, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # every validation image exactly once over the ranks (DistributedSampler would pad with repeats)
    val_sampler = list(range(rank, len(val), common.world_size())) if common.world_size() > 1 else None
    val_loader = DataLoader(val, batch_size=max(1, args.batch_per_rank // 2), sampler=val_sampler,
                            num_workers=args.workers, collate_fn=as_list)
    return train_loader, val_loader, num_classes, names
