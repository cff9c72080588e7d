"""`--gpu-augment`: the CPU workers only read and decode; the views are cropped and augmented on the
device, per sample, in a few batched kernels.

Why: a ResNet-50 step on an H100 consumes more images per second than 16 CPU cores can decode
*and* augment (README, Performance: about 36 images/s of MoCo v2's two views per core). Decoding
alone is the cheaper part; this module moves the rest to the accelerator.

    workers:  DecodeOnly        PIL image -> uint8 (3, h, w), long side capped at --max-side
    collate:  pad_collate       -> uint8 (B, 3, H, W) padded, sizes (B, 2)
    device:   MoCoV2Views       -> two normalised (B, 3, S, S) views, as common.moco_v2_augmentation

The same distribution as the PIL/v2 pipeline, computed differently (tests/test_gpu_augment.py
checks both): RandomResizedCrop parameters are drawn exactly as torchvision's get_params (10
tries, then the centre-crop fallback), vectorised; the crop and resize is one roi_align with an
adaptive sampling grid (a box filter where PIL's bilinear uses a triangle when shrinking: equal
within interpolation tolerance); colour jitter applies brightness, contrast, saturation and hue in
a random order per sample, with torchvision's tensor formulas (PIL works in uint8, rounding after
each step); grayscale with torchvision's weights; Gaussian blur with a per-sample sigma, the same
kernel size (common.blur_kernel) and reflect padding. Random numbers come from the device's
default generator, whose state the checkpoints save, so a resumed run sees the same views.
Deviation: images larger than --max-side (default 512) are shrunk by the workers first, so that a
batch pads to a bounded size; ImageNet and COCO images are at most 500 and 640 px.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

import common

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# =================================================================================================
# CPU side: decode only
# =================================================================================================
class DecodeOnly:
    """PIL image -> uint8 tensor (3, h, w); the long side shrunk to max_side if larger."""

    def __init__(self, max_side=512):
        self.max_side = max_side

    def __call__(self, img):
        if max(img.size) > self.max_side:
            s = self.max_side / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def pad_collate(batch):
    """uint8 images of different sizes -> (B, 3, H, W) zero-padded, and their (h, w) as (B, 2)."""
    H, W = max(x.shape[1] for x in batch), max(x.shape[2] for x in batch)
    out = torch.zeros(len(batch), 3, H, W, dtype=torch.uint8)
    for i, x in enumerate(batch):
        out[i, :, :x.shape[1], :x.shape[2]] = x
    return out, torch.tensor([x.shape[1:] for x in batch])


# =================================================================================================
# Device side: crop parameters, crop, colour, blur
# =================================================================================================
def crop_params(sizes, scale, ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop.get_params for every image at once.

    sizes: (N, 2) float (h, w). Returns (N, 4) boxes (x0, y0, x1, y1) in pixels: the first of
    `tries` draws (area fraction ~ U(scale), log aspect ~ U(log ratio)) that fits, with integer
    sides and offsets; else the centre crop clamped to `ratio`."""
    N, device = len(sizes), sizes.device
    h, w = sizes[:, 0:1], sizes[:, 1:2]  # (N, 1)
    area = h * w * torch.empty(N, tries, device=device).uniform_(*scale)  # (N, tries)
    aspect = torch.exp(torch.empty(N, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # (N, tries)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.int().argmax(1), -1)  # (N,) index of the first fitting try
    # the fallback: the whole image, narrowed to the ratio range, centred
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    ok = first >= 0
    idx = first.clamp(min=0)[:, None]
    cw = torch.where(ok[:, None], cw.gather(1, idx), fw)[:, 0]  # (N,)
    ch = torch.where(ok[:, None], ch.gather(1, idx), fh)[:, 0]
    u = torch.rand(N, 2, device=device)  # offsets ~ randint(0, side - crop + 1)
    y0 = torch.where(ok, torch.floor(u[:, 0] * (h[:, 0] - ch + 1)), torch.div(h[:, 0] - ch, 2, rounding_mode="floor"))
    x0 = torch.where(ok, torch.floor(u[:, 1] * (w[:, 0] - cw + 1)), torch.div(w[:, 0] - cw, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, x0 + cw, y0 + ch], 1)  # (N, 4)


def resized_crops(images, boxes, size):
    """images (B, 3, H, W) float, boxes (N, 4) of image n % B... -> (N, 3, size, size). One roi_align:
    bilinear at the bin centres (aligned=True, as resize with align_corners=False), with
    ceil(crop / size) x ceil(crop / size) samples per output pixel when shrinking."""
    idx = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None] % len(images)
    return roi_align(images, torch.cat([idx, boxes], 1), (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def gray(x):
    """(N, 3, H, W) -> (N, 1, H, W) luma with torchvision's weights."""
    return (x * x.new_tensor(GRAY)[:, None, None]).sum(1, keepdim=True)


def rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    v, delta = maxc, maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, *i.shape[1:]))[0]  # (N, 3, H, W)


def color_jitter(x, brightness, contrast, saturation, hue):
    """Per-sample ColorJitter on (N, 3, H, W) in [0, 1]: factors (N,) for each op (1 / 0 = identity)
    applied in a random order per sample, as torchvision draws a permutation per call."""
    N = len(x)
    order = torch.argsort(torch.rand(N, 4, device=x.device), 1)  # (N, 4): a permutation per sample
    f = lambda v: v[:, None, None, None]
    ops = (lambda y: y * f(brightness),
           lambda y: f(contrast) * y + (1 - f(contrast)) * gray(y).mean((1, 2, 3), keepdim=True),
           lambda y: f(saturation) * y + (1 - f(saturation)) * gray(y),
           lambda y: shift_hue(y, f(hue)))
    for position in range(4):  # every op on the whole batch, kept where it is this sample's: no host sync
        for k, op in enumerate(ops):
            x = torch.where(f(order[:, position] == k), op(x).clamp(0, 1), x)
    return x


def shift_hue(x, shift):
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.cat([(hsv[:, :1] + shift) % 1.0, hsv[:, 1:]], 1))


def gaussian_blur(x, sigma, kernel_size):
    """Per-sample Gaussian blur of (N, 3, H, W), sigma (N,): separable, reflect padding."""
    N, C, H, W = x.shape
    r = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N·C, k)
    y = F.pad(x.reshape(1, N * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=N * C)  # horizontal
    y = F.conv2d(y, k[:, None, :, None], groups=N * C)  # vertical
    return y.reshape(N, C, H, W)


class MoCoV2Views:
    """common.moco_v2_augmentation on the device: two views of every image of a decoded batch.
    Crop (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur 0.5 with
    sigma U(0.1, 2), flip 0.5, ImageNet normalisation."""

    def __init__(self, size, scale=(0.2, 1.0)):
        self.size, self.scale, self.kernel = size, scale, common.blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = batch
        images = images.to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W)
        B = len(images)
        boxes = crop_params(sizes.to(device).float().repeat(2, 1), self.scale)  # (2B, 4): view 1, then view 2
        x = resized_crops(images, boxes, self.size)  # (2B, 3, S, S)
        u = lambda lo, hi: torch.empty(2 * B, device=device).uniform_(lo, hi)
        jitter = torch.rand(2 * B, device=device) < 0.8
        one, zero = torch.ones(2 * B, device=device), torch.zeros(2 * B, device=device)
        x = color_jitter(x, torch.where(jitter, u(0.6, 1.4), one), torch.where(jitter, u(0.6, 1.4), one),
                         torch.where(jitter, u(0.6, 1.4), one), torch.where(jitter, u(-0.1, 0.1), zero))
        x = torch.where((torch.rand(2 * B, device=device) < 0.2)[:, None, None, None], gray(x).expand_as(x), x)
        blurred = gaussian_blur(x, u(0.1, 2.0), self.kernel)
        x = torch.where((torch.rand(2 * B, device=device) < 0.5)[:, None, None, None], blurred, x)
        x = torch.where((torch.rand(2 * B, device=device) < 0.5)[:, None, None, None], x.flip(-1), x)
        x = (x - x.new_tensor(common.IMAGENET_MEAN)[:, None, None]) / x.new_tensor(common.IMAGENET_STD)[:, None, None]
        return list(x.split(B))  # [view 1 (B, 3, S, S), view 2]
