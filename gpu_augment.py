"""`--gpu-augment`: the CPU workers only read and decode; the views are cropped and augmented on the
device, per sample, in a few batched kernels.

Why: a ResNet-50 step on an H100 consumes more images per second than 16 CPU cores can decode
*and* augment (README, Performance: about 36 images/s of MoCo v2's two views per core). Decoding
alone is the cheaper part; this module moves the rest to the accelerator.

    workers:  DecodeOnly        PIL image -> uint8 (3, h, w), long side capped at --max-side
    collate:  pad_collate       -> uint8 (B, 3, H, W) padded, sizes (B, 2)
    device:   MoCoV2Views       -> two views, as imagedata.moco_v2_augmentation  (moco, densecl, decon_densecl)
              OverlappingViews  -> views, overlap boxes, flips, as decon.TwoCropsWithOverlap  (decon)
              EightCropViews    -> eight views, as mcl.EightCrops  (mcl)
              MultiCropViews    -> globals, locals, queries, as adclr.MultiCropWithQueries  (adclr)

The same distribution as the PIL/v2 pipeline, computed differently (tests/test_gpu_augment.py
checks both): RandomResizedCrop parameters are drawn exactly as torchvision's get_params (10
tries, then the centre-crop fallback), vectorised; the crop and resize is one roi_align with an
adaptive sampling grid (a box filter where PIL's bilinear uses a triangle when shrinking: equal
within interpolation tolerance); colour jitter applies brightness, contrast, saturation and hue in
a random order per sample, with torchvision's tensor formulas (PIL works in uint8, rounding after
each step); grayscale with torchvision's weights; Gaussian blur with a per-sample sigma, the same
kernel size (imagedata.blur_kernel) and reflect padding. Random numbers come from the device's
default generator, whose state the checkpoints save, so a resumed run sees the same views.
Deviations: images larger than --max-side (default 512) are shrunk by the workers first, so that a
batch pads to a bounded size (ImageNet and COCO images are at most 500 and 640 px); crops are
resized bilinearly, also where the CPU pipelines use bicubic (SlotCon/DeCon and DINO/ADCLR crops):
roi_align has no bicubic mode.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

import imagedata

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


def colour(x, strength, p_jitter, p_gray, p_blur, p_solarize, kernel):
    """The colour half of the MoCo v2 / BYOL pipelines on (N, 3, S, S) in [0, 1], each part drawn
    per sample: ColorJitter(*strength) with p_jitter, grayscale p_gray, blur sigma U(0.1, 2) with
    p_blur, solarize (threshold 128 / 255) with p_solarize; then ImageNet normalisation."""
    N, device = len(x), x.device
    draw = lambda p: (torch.rand(N, device=device) < p)[:, None, None, None]
    u = lambda lo, hi: torch.empty(N, device=device).uniform_(lo, hi)
    b, c, s, h = strength
    on = torch.rand(N, device=device) < p_jitter
    one, zero = torch.ones(N, device=device), torch.zeros(N, device=device)
    x = color_jitter(x, torch.where(on, u(1 - b, 1 + b), one), torch.where(on, u(1 - c, 1 + c), one),
                     torch.where(on, u(1 - s, 1 + s), one), torch.where(on, u(-h, h), zero))
    x = torch.where(draw(p_gray), gray(x).expand_as(x), x)
    if p_blur > 0:
        x = torch.where(draw(p_blur), gaussian_blur(x, u(0.1, 2.0), kernel), x)
    if p_solarize > 0:
        x = torch.where(draw(p_solarize) & (x >= 128 / 255), 1 - x, x)
    return normalise(x)


def normalise(x):
    return (x - x.new_tensor(imagedata.IMAGENET_MEAN)[:, None, None]) / x.new_tensor(imagedata.IMAGENET_STD)[:, None, None]


def crops(images, sizes, n, size, scale, flip_p=0.5):
    """n crops of every image: (n·B, 3, size, size) in [0, 1] (crop k of image b at k·B + b), their
    boxes (n·B, 4) in [0, 1] image units and flips (n·B,)."""
    boxes = crop_params(sizes.float().repeat(n, 1), scale)  # (n·B, 4) pixels
    x = resized_crops(images, boxes, size)
    flips = torch.rand(len(boxes), device=boxes.device) < flip_p
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x, boxes / sizes.float().flip(1).repeat(n, 2), flips


def decoded(batch, device):
    images, sizes = batch
    return images.to(device, non_blocking=True).float().div_(255), sizes.to(device)  # (B, 3, H, W) in [0, 1]


MOCO = dict(strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2)
BYOL = dict(strength=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2)


class MoCoV2Views:
    """imagedata.moco_v2_augmentation on the device: two views of every image of a decoded batch.
    Crop (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur 0.5, flip 0.5."""

    def __init__(self, size, scale=(0.2, 1.0)):
        self.size, self.scale, self.kernel = size, scale, imagedata.blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = decoded(batch, device)
        x, _, _ = crops(images, sizes, 2, self.size, self.scale)  # (2B, 3, S, S): view 1, then view 2
        x = colour(x, **MOCO, p_blur=0.5, p_solarize=0.0, kernel=self.kernel)
        return list(x.split(len(images)))  # [view 1 (B, 3, S, S), view 2]


class OverlappingViews:
    """decon.TwoCropsWithOverlap on the device: two crops whose overlap covers at least 1% of the
    second (the first of 10 candidates; else the first crop twice), BYOL's asymmetric colour
    (blur 1.0 / 0.1, solarize 0 / 0.2). Returns ([v1, v2], overlap boxes (B, 2, 4), flips (B, 2))
    as the CPU pipeline; `overlap_boxes` is decon.overlap_boxes (passed in: this module does not
    import the method files)."""

    def __init__(self, size, min_scale, overlap_boxes):
        self.size, self.scale, self.kernel, self.overlap_boxes = size, (min_scale, 1.0), imagedata.blur_kernel(size), overlap_boxes

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = decoded(batch, device)
        B = len(images)
        b1 = crop_params(sizes.float(), self.scale) / sizes.float().flip(1).repeat(1, 2)  # (B, 4) in [0, 1]
        cand = (crop_params(sizes.float().repeat(10, 1), self.scale) / sizes.float().flip(1).repeat(10, 2)).view(10, B, 4)
        inter = (torch.minimum(b1[..., 2:], cand[..., 2:]) - torch.maximum(b1[..., :2], cand[..., :2])).clamp(min=0).prod(-1)
        ok = inter >= 0.01 * (cand[..., 2:] - cand[..., :2]).prod(-1)  # (10, B)
        first = ok.int().argmax(0)  # the first overlapping candidate (0 if none)
        b2 = torch.where(ok.any(0)[:, None], cand[first, torch.arange(B, device=device)], b1)  # (B, 4)
        f1 = torch.rand(B, device=device) < 0.5
        f2 = torch.where(ok.any(0), torch.rand(B, device=device) < 0.5, f1)
        wh = sizes.float().flip(1).repeat(1, 2)
        x = resized_crops(images, torch.cat([b1, b2]) * torch.cat([wh, wh]), self.size)  # (2B, 3, S, S)
        flips = torch.cat([f1, f2])
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        v1 = colour(x[:B], **BYOL, p_blur=1.0, p_solarize=0.0, kernel=self.kernel)
        v2 = colour(x[B:], **BYOL, p_blur=0.1, p_solarize=0.2, kernel=self.kernel)
        return [v1, v2], self.overlap_boxes(b1, f1, b2, f2), torch.stack([f1, f2], 1)


class EightCropViews:
    """mcl.EightCrops on the device: four crops per branch (scale 0.2-1), BYOL's asymmetric colour.
    Returns 8 batches (B, 3, S, S): branch 1's four, then branch 2's."""

    def __init__(self, size):
        self.size, self.kernel = size, imagedata.blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = decoded(batch, device)
        B = len(images)
        x, _, _ = crops(images, sizes, 8, self.size, (0.2, 1.0))  # (8B, 3, S, S)
        x = torch.cat([colour(x[:4 * B], **BYOL, p_blur=1.0, p_solarize=0.0, kernel=self.kernel),
                       colour(x[4 * B:], **BYOL, p_blur=0.1, p_solarize=0.2, kernel=self.kernel)])
        return list(x.split(B))


class MultiCropViews:
    """adclr.MultiCropWithQueries on the device: 2 global views (BYOL's asymmetric colour), n local
    views (jitter, grayscale, blur 0.5) and Q query crops (colour as the local views with
    --query-augment local). Returns ([g1, g2], [locals], queries (B, Q, 3, q, q))."""

    def __init__(self, args):
        self.args = args

    @torch.no_grad()
    def __call__(self, batch, device):
        a = self.args
        images, sizes = decoded(batch, device)
        B = len(images)
        g, _, _ = crops(images, sizes, 2, a.global_size, tuple(a.global_scale))
        k = imagedata.blur_kernel(a.global_size)
        globals_ = [colour(g[:B], **BYOL, p_blur=1.0, p_solarize=0.0, kernel=k),
                    colour(g[B:], **BYOL, p_blur=0.1, p_solarize=0.2, kernel=k)]
        local = []
        if a.local_crops:
            x, _, _ = crops(images, sizes, a.local_crops, a.local_size, tuple(a.local_scale))
            local = list(colour(x, **BYOL, p_blur=0.5, p_solarize=0.0, kernel=imagedata.blur_kernel(a.local_size)).split(B))
        queries = torch.zeros(0, device=device)
        if a.num_queries:
            q, _, _ = crops(images, sizes, a.num_queries, a.query_size, tuple(a.query_scale), flip_p=0.0)
            if a.query_augment == "local":
                q = colour(q, **BYOL, p_blur=0.5, p_solarize=0.0, kernel=imagedata.blur_kernel(a.query_size))
            else:
                q = normalise(q)
            queries = q.view(a.num_queries, B, *q.shape[1:]).transpose(0, 1)  # (B, Q, 3, q, q)
        return globals_, local, queries
