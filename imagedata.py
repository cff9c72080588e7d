"""Images for the method files: the built-in synthetic scenes (with their label maps), the --data
presets (COCO, ImageNet, any folder), and the augmentation pipelines of the papers.

A method file copied into another project needs this file, backbones.py and common.py next to it.
"""
import math
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# =================================================================================================
# Synthetic data: procedurally generated scenes with a per-pixel label map
# =================================================================================================
SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "crescent", "ell")
SYNTHETIC_CLASSES = ("background",) + SHAPES
VAL_INDEX_OFFSET = 1_000_000  # validation scenes use indices from here on: never a training index
SCENE_STYLES = ("colour", "mono")  # synthetic_scene's style (--synthetic-style)
MONO_GREYS = np.array([[40, 40, 40], [215, 215, 215]], np.float32)  # the objects' two colours in "mono" scenes


def _shape_mask(cls, u, v):
    """Boolean mask of shape class `cls` on object-centred, rotated, radius-1 coordinates."""
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    if cls == 0:  # disc
        return r <= 1.0
    if cls == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if cls == 2:  # equilateral triangle: a regular polygon in polar form
        a = np.mod(phi, 2 * np.pi / 3) - np.pi / 3
        return r * np.cos(a) <= 0.5
    if cls == 3:  # five-pointed star
        t = np.mod(phi * 5 / (2 * np.pi), 1.0)
        return r <= 0.42 + 0.58 * np.abs(1 - 2 * t) ** 1.5
    if cls == 4:  # ring
        return (r <= 1.0) & (r >= 0.6)
    if cls == 5:  # cross
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if cls == 6:  # crescent
        return (r <= 1.0) & (np.hypot(u - 0.5, v) > 0.8)
    return ((u >= -0.8) & (u <= -0.25) & (np.abs(v) <= 0.85)) | (  # ell
        (u >= -0.8) & (u <= 0.8) & (v >= 0.3) & (v <= 0.85))


TEXTURES = ("solid", "stripes", "broad stripes", "checks", "dots", "rings", "fine stripes", "speckle")  # per class


def _texture(cls, u, v, size, rng):
    """Class `cls`'s texture in [0, 1] (0: the object's first colour, 1: its second) at pixel offsets
    u, v along the object's own (rotated) axes; periods are fractions of the scene side."""
    if cls == 0:
        return np.zeros_like(u)
    if cls in (1, 2, 6):  # stripes across the object's u axis: medium, broad, fine
        return (np.mod(u / (size / {1: 10, 2: 5, 6: 16}[cls]), 1.0) < 0.5).astype(np.float32)
    if cls == 3:
        return ((np.floor(u / (size / 8)) + np.floor(v / (size / 8))) % 2).astype(np.float32)
    if cls == 4:
        du, dv = np.mod(u / (size / 8), 1.0) - 0.5, np.mod(v / (size / 8), 1.0) - 0.5
        return (np.hypot(du, dv) < 0.25).astype(np.float32)
    if cls == 5:
        return (np.mod(np.hypot(u, v) / (size / 10), 1.0) < 0.5).astype(np.float32)
    cell = max(size / 32, 1.0)  # speckle: random cells
    iu, iv = ((u - u.min()) // cell).astype(int), ((v - v.min()) // cell).astype(int)
    return (rng.random((iv.max() + 1, iu.max() + 1)) < 0.5)[iv, iu].astype(np.float32)


def synthetic_scene(index, seed=0, size=224, instances=False, style="colour"):
    """Scene `index` as (PIL RGB image, uint8 label map; 0 = background, k = SHAPES[k-1]), and with
    instances=True also the uint8 instance map (0 = none, k = the k-th object drawn, as occluded).

    Deterministic in (seed, index, style). Each object's class shows in its shape and in its texture
    (a class-specific pattern of its two colours, drawn in the object's own frame: TEXTURES). Both
    colours are drawn independently of the class, so a pixel's colour does not tell the class; a
    network has to look at a neighbourhood. Later objects occlude earlier ones in image and label.

    style "colour": a random colour grating for the background, random colours for the objects.
    style "mono": no colour anywhere: a grey (128) background plus the same noise, every object dark
    (40) and light (215) grey in a random order. A pixel's grey tells figure from ground but not the
    class, and colour can no longer tell two scenes apart, so the instance pretexts have to use the
    shapes (README, the miniature reproduction: the first scenes on which MoCo v2 rises in every seed).
    """
    if style not in SCENE_STYLES:
        raise ValueError(f"unknown synthetic scene style {style!r}: use one of {', '.join(SCENE_STYLES)}")
    rng = np.random.default_rng([seed, index])
    ax = np.arange(size, dtype=np.float32) / size
    # Background: a fine sinusoidal grating between two random colours (separable: sin(a+b)
    # expanded) plus blocky noise, so figure and ground differ locally too.
    # In mono too, unused: both styles then draw the same numbers up to the first object's colours.
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(12, 28), rng.uniform(0, 2 * np.pi)
    if style == "mono":
        img = np.full((size, size, 3), 128, np.float32)  # (H, W, 3)
    else:
        a = 2 * np.pi * freq * np.cos(theta) * ax
        b = 2 * np.pi * freq * np.sin(theta) * ax + phase
        grating = 0.5 + 0.5 * (np.outer(np.cos(b), np.sin(a)) + np.outer(np.sin(b), np.cos(a)))
        img = c0 + (c1 - c0) * grating[..., None]  # (H, W, 3)
    block = max(size // 56, 1)  # 4 px at 224
    cells = size // block + 1
    noise = rng.normal(0, 20, (cells, cells, 1)).astype(np.float32)
    img += noise.repeat(block, 0).repeat(block, 1)[:size, :size]
    label, instance = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    for k in range(1, rng.integers(3, 7) + 1):  # 3-6 objects: about 45% of the pixels are foreground
        cls = int(rng.integers(len(SHAPES)))
        rad = rng.uniform(0.2, 0.4) * size
        cx, cy = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        if style == "mono":
            colours = MONO_GREYS[rng.permutation(2)]  # class-independent
        else:
            colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)  # class-independent
        x0, x1 = int(max(cx - rad, 0)), int(min(cx + rad + 1, size))
        y0, y1 = int(max(cy - rad, 0)), int(min(cy + rad + 1, size))
        if x1 <= x0 or y1 <= y0:
            continue
        py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = px - cx, py - cy
        u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)  # pixels, object frame
        mask = _shape_mask(cls, u / rad, v / rad)
        texture = _texture(cls, u, v, size, rng)[..., None]
        img[y0:y1, x0:x1][mask] = (colours[0] + (colours[1] - colours[0]) * texture)[mask]
        label[y0:y1, x0:x1][mask] = cls + 1
        instance[y0:y1, x0:x1][mask] = k
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return (image, label, instance) if instances else (image, label)


class SyntheticScenes(Dataset):
    """`length` synthetic scenes of one split; returns transform(image), or (image, label) pairs."""

    def __init__(self, length, size=224, seed=0, split="train", transform=None, with_labels=False, style="colour"):
        self.length, self.size, self.seed, self.transform, self.style = length, size, seed, transform, style
        self.offset = 0 if split == "train" else VAL_INDEX_OFFSET
        self.with_labels = with_labels

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img, label = synthetic_scene(self.offset + i, self.seed, self.size, style=self.style)
        if self.with_labels:
            return self.transform(img, label) if self.transform else (img, label)
        return self.transform(img) if self.transform else img


# =================================================================================================
# Image folders: the --data presets
# =================================================================================================
DATA_LAYOUTS = {
    "coco": ["coco/train2017"],
    "coco+": ["coco/train2017", "coco/unlabeled2017"],
    "imagenet": ["imagenet/train"],
}
LAYOUT_HELP = {
    "coco": "<data-root>/coco/train2017/*.jpg",
    "coco+": "<data-root>/coco/train2017/*.jpg and <data-root>/coco/unlabeled2017/*.jpg",
    "imagenet": "<data-root>/imagenet/train/<class>/*.JPEG",
}


def default_data_root():
    """--data-root default: $DATA_ROOT, else ./data."""
    return os.environ.get("DATA_ROOT", "./data")


def find_images(folder):
    """Sorted list of image files below `folder` (recursive, by extension)."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def resolve_image_folders(data, data_root):
    """The list of image folders a --data value points at, with a clear error when one is missing."""
    if data in DATA_LAYOUTS:
        folders = [Path(data_root) / sub for sub in DATA_LAYOUTS[data]]
        expected = LAYOUT_HELP[data]
    else:
        folders, expected = [Path(data)], f"{data}/**/*.jpg (any folder of images, searched recursively)"
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--data {data}: folder {folder} does not exist. Expected layout: {expected}. "
                f"Set --data-root (or $DATA_ROOT) to the folder that holds it, or use --data synthetic.")
    return folders, expected


def open_rgb(path, exif=True):
    """An image file as 8-bit RGB: EXIF orientation applied (photos from cameras and phones), and
    16-bit or float images scaled to 8 bit rather than clipped (convert("RGB") would turn a 16-bit
    PNG white)."""
    with Image.open(path) as f:
        img = ImageOps.exif_transpose(f) if exif else f.copy()
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255) else (
            1.0 if img.mode == "F" and a.max() <= 1 else 255.0)
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _remove_folder_of(folder, pid):
    if os.getpid() == pid:  # the process that made it, not a forked loader worker exiting
        shutil.rmtree(folder, ignore_errors=True)


class ImageFiles(Dataset):
    """Images from a list of files; an unreadable image is skipped for the next, with one warning per
    file for the whole run (loader workers share a folder of markers made with O_EXCL)."""

    def __init__(self, files, transform=None):
        self.files, self.transform = files, transform
        self.warned = tempfile.mkdtemp(prefix="dense-ssl-unreadable-")
        weakref.finalize(self, _remove_folder_of, self.warned, os.getpid())  # not left behind in /tmp

    def __len__(self):
        return len(self.files)

    def warn_once(self, path, error):
        marker = os.path.join(self.warned, str(abs(hash(path))))
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # only the first process to see the file warns
        except FileExistsError:
            return
        warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}")

    def __getitem__(self, i):
        for attempt in range(len(self.files)):
            path = self.files[(i + attempt) % len(self.files)]
            try:
                img = open_rgb(path)
                break
            except Exception as e:  # corrupt, truncated or unreadable: never stop the run for one file
                self.warn_once(path, e)
        else:
            raise RuntimeError("no readable image in the dataset")
        return self.transform(img) if self.transform else img


def build_pretrain_dataset(args, transform):
    """The pre-training dataset for --data (synthetic, coco, coco+, imagenet, or a folder path)."""
    if args.data == "synthetic":
        return SyntheticScenes(args.synthetic_len, args.synthetic_size or args.image_size * 8 // 7,
                               seed=args.seed, transform=transform, style=args.synthetic_style)
    folders, expected = resolve_image_folders(args.data, args.data_root)
    files = [f for folder in folders for f in find_images(folder)]
    if not files:
        raise FileNotFoundError(
            f"--data {args.data}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
            f"{', '.join(map(str, folders))}. Expected layout: {expected}.")
    return ImageFiles(files, transform)


def add_data_args(parser):
    """The --data/--data-root/--synthetic-* flags every method file shares."""
    parser.add_argument("--data", default="synthetic",
                        help="synthetic (built in, no download) | coco | coco+ | imagenet | a folder of images")
    parser.add_argument("--data-root", default=default_data_root(), help="root of the presets ($DATA_ROOT or ./data)")
    parser.add_argument("--synthetic-len", type=int, default=10000, help="images per epoch of --data synthetic")
    parser.add_argument("--synthetic-size", type=int, default=0, help="side of a synthetic scene (0: 8/7 of --image-size)")
    parser.add_argument("--synthetic-style", default="colour", choices=SCENE_STYLES,
                        help="synthetic scenes in colour, or mono: grey background, dark and light grey objects")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers per process")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="the workers only decode; crops, colour, blur and flips run on the device (gpu_augment.py)")
    parser.add_argument("--max-side", type=int, default=512, help="--gpu-augment: images shrunk to this long side first")


# =================================================================================================
# Augmentations (torchvision.transforms.v2)
# =================================================================================================
def _to_tensor_normalised():
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def blur_kernel(size, sigma_max=2.0):
    """Odd Gaussian kernel side: 10% of the crop as BYOL/SimCLR (23 px at 224), but never fewer taps
    than +-3 sigma_max (13 at sigma 2), so that small crops are not blurred with a truncated kernel
    (the official MoCo/DINO/MCL pipelines use PIL's blur, which has no kernel size)."""
    return max(2 * math.ceil(3 * sigma_max) + 1, int(0.1 * size) // 2 * 2 + 1)


def moco_v2_augmentation(size=224):
    """MoCo v2 "aug-plus": crop (0.2, 1), colour jitter 0.8, grayscale 0.2, blur 0.5, flip."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        *_to_tensor_normalised(),
    ])


def byol_augmentations(size=224, scale=(0.08, 1.0), crop=True, interpolation=v2.InterpolationMode.BILINEAR):
    """The BYOL asymmetric pair: (blur 1.0, solarize 0) and (blur 0.1, solarize 0.2). DINO crops
    bicubic (interpolation=BICUBIC); MCL/BYOL with torchvision's default, bilinear."""
    def branch(blur_p, solarize_p):
        head = [v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True),
                v2.RandomHorizontalFlip()] if crop else []
        return v2.Compose(head + [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(128, p=solarize_p),
            *_to_tensor_normalised(),
        ])
    return branch(1.0, 0.0), branch(0.1, 0.2)


class TwoViews:
    """Two independently augmented views of one image: [t1(img), t2(img)]."""

    def __init__(self, t1, t2=None):
        self.t1, self.t2 = t1, t2 or t1

    def __call__(self, img):
        return [self.t1(img), self.t2(img)]
