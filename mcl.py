"""MCL: multi-level contrastive learning with a montage pretext, for dense prediction.

Paper: Guo, Yu, Jiang, Wu, Yuan, Luo, "Multi-Level Contrastive Learning for Dense Prediction Task",
2023, https://arxiv.org/abs/2304.02010. Official code: https://github.com/GuoQiushan/MCL
(openselfsup/models/mcl.py, necks.py DetConvGpNonLinearHead, configs/selfsup/MCL/MCL.py).

Method. Every image is cropped 8 times (4 crops per branch, BYOL's asymmetric augmentations). In
each branch, crop l is shrunk by a ratio r in {1, 2, 4, 8} and pasted as a tile into r x r grid
"montages" of the full input size, tiles assigned to grid cells by a random permutation. A tile of
ratio r then covers exactly one 7 x 7 window of the FPN map whose stride matches its scale (r = 1:
P5, 2: P4, 4: P3, 8: P2). A region head (4 convs, pooling, MLP) embeds every window, and a
predictor per ratio maps it into the target space. The positive of every tile is the EMA target
network's P5 embedding of the *other* branch's ratio-1 crop of the same source image (the full
224-px view, not the tile's own crop); the negatives are the other images' targets over the global
batch: an InfoNCE (T = 1.0, multiplied by 2T as the official head, so that T sets the softmax's
sharpness and not the gradient's scale) asks each tile to identify its source image. Level
weights 1/2, 1/4, 1/8, 1/8; both branches summed. There is no queue. The montage teaches
scale-aware, position-aware features at every pyramid level, which transfer to detectors (the FPN
and the head's convs are exported too).

Vocabulary, one direction throughout: "level l" = 0, 1, 2, 3 indexes RATIOS r = 1, 2, 4, 8 (the
tile's shrink factor) and their FPN maps PYRAMID[r] = P5, P4, P3, P2, named, never by list index;
each level has one predictor, one loss weight and one montage count.

Montage rule, per process batch B: montages per ratio [B, B // 4, B // 16, B // 32] (the official config's
[128, 32, 8, 4] at B = 128), so ratios 1-4 hold B tiles and ratio 8 holds 2B: an 8 x 8 montage has
64 slots, and the official count of B/32 montages fills 2B of them, so every image appears once per
ratio and twice at ratio 8. Slot s of a ratio shows image perm[s] mod B; ratio 1 is the batch
itself, in order. B must be a multiple of 32. Worked shapes for B = 32 at 224 px (window side =
tile / stride = (224 / r) / (32 / r) = 7 at every ratio):

    r | tile   | montages | slots | FPN map, stride | windows per montage | predictions | scored against
    1 | 224 px |    32    |  32   | P5  7 x 7, 32   |  1 (7 x 7)          |  (32, 256)  | the other branch's
    2 | 112 px |     8    |  32   | P4 14 x 14, 16  |  4 (2 x 2 grid)     |  (32, 256)  | 256-d targets of all
    4 |  56 px |     2    |  32   | P3 28 x 28, 8   | 16 (4 x 4 grid)     |  (32, 256)  | images of all ranks,
    8 |  28 px |     1    |  64   | P2 56 x 56, 4   | 64 (8 x 8 grid)     |  (64, 256)  | label = source image

Launch:
    python mcl.py                                                    # ImageNet recipe, synthetic data
    python mcl.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 --synthetic-len 2048 --lr 0.5   # CPU demo
    python mcl.py ... --save-montage montage.png                     # draw one montage per ratio and exit
    python mcl.py --data /path/to/images                             # your images
    torchrun --nproc_per_node=8 mcl.py --data imagenet --batch-size 4096

Reference results (abstract; not reproduced here): Mask R-CNN R50-FPN 1x on COCO 42.5 AP box /
38.3 AP mask after 100 ImageNet epochs, +4.0 / +3.1 over MoCo. Measured here: the miniature
reproduction (docs/miniature.md, `python benchmarks/bench.py quality`).

Deviations from the official code:
- --head-windows scored runs the region head on the scored windows only: 4.51 instead of 9.41 TFLOP
  per step (ResNet-50, B = 32, 224 px; torch.utils.flop_counter, forward + backward). It changes
  the head's BatchNorm statistics, so the official "all" is the default.
- --tile-resize antialias shrinks tiles with antialiased bilinear instead of nearest.
- SyncBN under DDP on CUDA only; bf16 autocast by default on CUDA (the official uses fp16 with apex;
  --amp fp16); the losses are computed in fp32 outside autocast.
- --gpu-augment (off by default): the eight crops on the device (EightCropViews), the
  same distribution, not the same pixels.
- The target runs the P5 path only (Online.forward_p5), the official target the whole network:
  its BatchNorm running statistics of P2-P4 and of its region head then differ from the official
  ones. Nothing reads them (the target normalises with batch statistics, the EMA covers parameters,
  the target is not exported), and the loss, gradients and weights are the official ones.

Checked against the official code (checks/official.py mcl runs it beside the official code;
tests/test_mcl.py a re-statement of its forward on the same weights and inputs): the online network
runs once per branch, the region head once per FPN map, P2 first, and the predictors once per
(branch, level), so every BatchNorm of the online network sees the batches the official code gives
it, in its order (the target's BatchNorm statistics of P2-P4 and its region head are the one
difference: they are never used, see below); by default the head embeds
*every* window of every montage at each FPN map, as the official neck does, and the scored ones are
sliced out. The target runs once per branch on all of that branch's montages (its BatchNorm sees
them all), through the P5 path only: it uses nothing else. Tiles are shrunk with F.interpolate's
default (nearest). LR: cosine over the whole run, multiplied during warm-up by a linear ramp from
1e-4; OpenSelfSup's LARS (lr inside the momentum) with the official parameter groups; the EMA
update follows the optimizer step; inits as the official code.
"""
import argparse
import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

RATIOS = (1, 2, 4, 8)  # level l shrinks its crop by RATIOS[l]
PYRAMID = {1: "p5", 2: "p4", 4: "p3", 8: "p2"}  # ratio -> its FPN map: stride 32 / r fits the tile


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MCL pre-training", formatter_class=common.HelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=common.RESNET_ARCHS, help="backbone (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop and montage side; a multiple of 32 (paper: 224)")
    p.add_argument("--temperature", type=float, default=1.0, help="InfoNCE temperature T (MCL: 1.0)")
    p.add_argument("--level-weights", type=float, nargs=4, default=(0.5, 0.25, 0.125, 0.125), help="per ratio 1, 2, 4, 8")
    p.add_argument("--base-momentum", type=float, default=0.99, help="EMA momentum, cosine to 1 (MCL: 0.99)")
    p.add_argument("--lr", type=float, default=1.0, help="LARS lr per 256 images (MCL: 1.0)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="end of the cosine (MCL: 1e-4)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="(MCL: 3127 iterations = 10 epochs at 4096)")
    p.add_argument("--warmup-ratio", type=float, default=1e-4, help="lr factor at step 0 of the warm-up (MCL: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="(MCL: 1e-5, not on BN and biases)")
    p.add_argument("--clip-grad", type=float, default=500.0, help="global gradient norm clip, 0 = none (MCL: 500)")
    p.add_argument("--head-windows", default="all", choices=["all", "scored"],
                   help="region head on every window of every montage (official) or on the scored ones only")
    p.add_argument("--tile-resize", default="nearest", choices=["nearest", "antialias"],
                   help="how tiles are shrunk: F.interpolate's nearest (official) or antialiased bilinear")
    p.add_argument("--save-montage", default=None, help="write a PNG of one montage per ratio for the first batch, then exit")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/mcl on the synthetic scenes, "
                        "runs/mcl-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=100, batch_size=4096)
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("mcl", args.data)
    common.check_args(p, args, positive=("lr", "temperature"),
                      non_negative=("weight_decay", "min_lr", "warmup_epochs", "clip_grad"))
    common.check_image_size(p, args, dense=False)
    common.split_batch(p, args)
    if args.batch_per_rank % 32:
        p.error(f"the per-process batch ({args.batch_per_rank}) must be a multiple of 32: the ratio-8 level pastes "
                f"64 tiles per montage and holds 2B tiles, i.e. B/32 montages (e.g. --batch-size 32, 64, 128 per process)")
    if args.image_size % 32:
        p.error(f"--image-size {args.image_size} must be a multiple of 32 (a ratio-8 tile covers one window of P2)")
    # Montages per ratio 1, 2, 4, 8. Ratios 1-4 hold B tiles: B / r² montages of r² cells. Ratio 8
    # would need B / 64 montages; the official config ([128, 32, 8, 4] at B = 128) gives B / 32,
    # 2B tiles of 64 cells each: every image twice. Hence B a multiple of 32.
    B = args.batch_per_rank
    args.montages = [B, B // 4, B // 16, B // 32]
    args.scaled_lr = args.lr * args.batch_size / 256
    return args


# =================================================================================================
# Data
# =================================================================================================
class EightCrops:
    """Four crops per branch, BYOL's asymmetric pipelines (crop scale 0.2-1, bilinear as torchvision)."""

    def __init__(self, size):
        self.t1, self.t2 = common.byol_augmentations(size, scale=(0.2, 1.0))

    def __call__(self, img):
        return [self.t1(img) for _ in range(4)] + [self.t2(img) for _ in range(4)]


class EightCropViews:
    """EightCrops on the device: four crops per branch (scale 0.2-1), BYOL's asymmetric colour.
    Returns 8 batches (B, 3, S, S): branch 1's four, then branch 2's."""

    def __init__(self, size):
        self.size, self.kernel = size, common.blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = common.device_images(batch, device)
        B = len(images)
        x, _, _ = common.device_crops(images, sizes, 8, self.size, (0.2, 1.0))  # (8B, 3, S, S)
        x = torch.cat([common.device_colour(x[:4 * B], **common.BYOL_COLOUR, p_blur=1.0, p_solarize=0.0, kernel=self.kernel),
                       common.device_colour(x[4 * B:], **common.BYOL_COLOUR, p_blur=0.1, p_solarize=0.2, kernel=self.kernel)])
        return list(x.split(B))


def build_data(args, device):
    """Eight crops of every image, four per branch. Returns the loader and, with --gpu-augment, the device-side
    augmentation (common.py, section 7) its decoded batches go through."""
    if args.gpu_augment:
        dataset = common.build_pretrain_dataset(args, common.DecodeOnly(args.max_side))
        return (common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device, common.pad_collate),
                EightCropViews(args.image_size))
    dataset = common.build_pretrain_dataset(args, EightCrops(args.image_size))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device), None


def save_montage_png(views, args, path):
    """One montage per ratio of the first branch, side by side, de-normalised."""
    from PIL import Image
    canvases, plan, _ = build_montages(views[:4], args.montages, args.tile_resize)
    firsts, start = [], 0
    for r, count in plan:
        firsts.append(canvases[start])
        start += count
    x = torch.cat(firsts, 2).detach().float().cpu()  # (3, H, 4·W); --gpu-augment's views sit on the device, maybe in bf16
    x = x * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)


# =================================================================================================
# Montage (data-side geometry; the model below reads its output by ratio and slot)
# =================================================================================================
def make_montage(tiles, r, count, perm):
    """Paste tiles into `count` r x r montages. tiles: (B, 3, t, t); perm: (r²·count,) a permutation
    of the slots; slot s shows image perm[s] mod B. Returns canvases (count, 3, r·t, r·t) and the
    source image of every slot (r²·count,), slot s = canvas·r² + row·r + column."""
    B, C, t, _ = tiles.shape
    source = perm % B  # (S,)
    grid = tiles[source].view(count, r, r, C, t, t)  # (count, row, col, C, t, t)
    canvas = grid.permute(0, 3, 1, 4, 2, 5)  # (count, C, row, t, col, t): rows of tiles, then columns
    return canvas.reshape(count, C, r * t, r * t), source


def montage_windows(feat, r):
    """The inverse cut: a feature map of n montages (n, C, r·w, r·w) into its r² windows per
    montage, (n·r², C, w, w), in slot order (the same row-major order make_montage pasted)."""
    n, C, H, W = feat.shape
    w = H // r
    windows = feat.view(n, C, r, w, r, w).permute(0, 2, 4, 1, 3, 5)  # (n, row, col, C, w, w)
    return windows.reshape(n * r * r, C, w, w)


def build_montages(branch_views, montages, tile_resize):
    """All montages of one branch: crop l is shrunk by RATIOS[l] and pasted at random; ratio 1 is the
    batch in order, as the official code. branch_views: 4 tensors (B, 3, H, W). Returns canvases
    (N, 3, H, W) in plan order, the plan [(r, count)] and the source image of every slot per level."""
    canvases, plan, sources = [], [], []
    for view, r, count in zip(branch_views, RATIOS, montages):
        if r == 1:
            canvas, source = view, torch.arange(view.shape[0], device=view.device)
        else:
            tiles = (F.interpolate(view, scale_factor=1 / r) if tile_resize == "nearest" else
                     F.interpolate(view, scale_factor=1 / r, mode="bilinear", antialias=True, align_corners=False))
            canvas, source = make_montage(tiles, r, count, torch.randperm(r * r * count, device=view.device))
        canvases.append(canvas)
        plan.append((r, count))
        sources.append(source)
    return torch.cat(canvases), plan, sources


# =================================================================================================
# Model
# =================================================================================================
class RegionHead(nn.Module):
    """MCL's region head (DetConvGpNonLinearHead), shared by all levels: 4 x (3x3 conv, BN, ReLU) on
    each 7 x 7 window, average pool, MLP 256 -> 2048 (BN, ReLU) -> 256, then a BN without affine
    parameters that standardises the embedding per dimension (as BYOL's projector; the official
    config's last_bn). (S, C, w, w) -> (S, 256). Inits as the official code: mmcv's ConvModule
    (kaiming normal, fan_out) for the convs, kaiming fan_in and zero bias for the Linears."""

    def __init__(self, channels=256, hidden=2048, out=256):
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))])
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.last_bn = nn.BatchNorm1d(out, affine=False)
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, windows):
        return self.last_bn(self.mlp(self.convs(windows).mean((2, 3))))


class Online(nn.Module):
    """ResNet + FPN (P2-P5) + region head: the network the target copies and downstream uses."""

    def __init__(self, arch, head_windows="all"):
        super().__init__()
        self.encoder = common.ResNetTrunk(arch, pyramid=True, conv_init="fan_in")  # OpenSelfSup's ResNet init
        self.fpn = common.FPN(self.encoder.channels, 256)
        for m in self.fpn.modules():  # the official FPN's init_weights: xavier uniform
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
        self.head = RegionHead()
        self.head_windows = head_windows

    def forward(self, canvases, plan):
        """One branch. canvases: (N, 3, H, W), the montages of every ratio in plan order; plan:
        [(r, count)] per level (both made by build_montages, in the Montage section above). Returns
        per level the embeddings of its count·r² tiles in slot order.
        The region head runs once per FPN map, P2 first as the official neck (its BatchNorms see
        one map at a time, in the official order): on every window of every canvas at that map
        (official), or only on the canvases of the level that map serves."""
        pyramid = dict(zip(("p2", "p3", "p4", "p5"), self.fpn(self.encoder(canvases))))  # BN statistics over this branch
        starts = [sum(count for _, count in plan[:l]) for l in range(len(plan))]  # each level's first canvas
        out = [None] * len(plan)
        for l in reversed(range(len(plan))):  # ratio 8 (P2) first, ratio 1 (P5) last
            (r, count), start = plan[l], starts[l]
            fmap = pyramid[PYRAMID[r]]  # (N, 256, r·w, r·w): each canvas holds r x r windows of side w
            if self.head_windows == "all":
                # Every window of every canvas, most of them on other levels' canvases that this
                # level never scores: the official neck embeds them all (and its BatchNorm sees them).
                emb = self.head(montage_windows(fmap, r)).view(len(canvases), r * r, -1)  # (N, r², 256)
                out[l] = emb[start:start + count].flatten(0, 1)  # (count·r², 256)
            else:
                out[l] = self.head(montage_windows(fmap[start:start + count], r))  # (count·r², 256)
        return out

    def forward_p5(self, canvases):
        """The target's path: the P5 embedding of every canvas (N, 256). P5 depends on C5 alone, so
        the lateral and output convs of P5 are all of the FPN it needs."""
        c5 = self.encoder(canvases)[-1]
        p5 = self.fpn.output["p5"](self.fpn.lateral[-1](c5))  # (N, 256, w, w): one window per canvas
        return self.head(p5)


class Student(nn.Module):
    """The online network plus one predictor per level (Linear-BN-ReLU-Linear, init normal(0, 0.01)
    as the official head), in one module so that DDP sees a single forward. Returns, per branch
    and level, the raw predictions (S, 256)."""

    def __init__(self, arch, head_windows="all"):
        super().__init__()
        self.online = Online(arch, head_windows)
        self.predictors = nn.ModuleList(nn.Sequential(nn.Linear(256, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                                                      nn.Linear(2048, 256)) for _ in RATIOS)
        for m in self.predictors.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, canvases_per_branch, plan):
        preds = []
        for canvases in canvases_per_branch:  # the official code calls the encoder once per branch
            z = self.online(canvases, plan)
            preds.append([self.predictors[l](z_l) for l, z_l in enumerate(z)])  # predictor BN per (branch, level)
        return preds


def official_param_groups(student):
    """LARS's parameter groups by MCL's rule (common.lars_param_groups has SlotCon's): the official
    paramwise options: no weight decay and no LARS adaptation for every bias and for
    the weights matched by the regex `(bn|gn)(\\d+)?.(weight|bias)`. That regex matches the
    BatchNorm2d layers' names (bn1, bn, ...) but not the ResNet shortcut's norm (`downsample.1`)
    nor the BatchNorm1d of the MLPs (`mlp.1`), whose weights therefore get LARS and weight decay."""
    excluded = set()
    for name, module in student.named_modules():
        if isinstance(module, nn.BatchNorm2d) and not name.endswith("downsample.1"):
            excluded.update(id(p) for p in module.parameters())
        if getattr(module, "bias", None) is not None:
            excluded.add(id(module.bias))
    params = [p for p in student.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in excluded]},
            {"params": [p for p in params if id(p) in excluded], "lars_exclude": True, "weight_decay": 0.0}]


# =================================================================================================
# Loss
# =================================================================================================
@common.fp32
def level_loss(pred, targets, labels, temperature):
    """InfoNCE of each tile's prediction against all full-image targets of the global batch.

    pred: (S, D) normalised predictions of S tiles; targets: (N, D) normalised target embeddings
    of the other branch (all ranks); labels: (S,) global index of each tile's source image.
    Scaled by 2T as the official head (so that T changes the sharpness, not the gradient scale).
    T = 1.0 and the level weights 1/2, 1/4, 1/8, 1/8 are the paper's: the full image weighs most,
    the small tiles, harder and noisier, least."""
    return F.cross_entropy(pred @ targets.T / temperature, labels) * 2 * temperature


@common.fp32
def multi_level_loss(preds, sources, targets_per_branch, weights, temperature):
    """The symmetrised multi-level loss, in fp32.

    preds:   per branch, per level, (S_l, D) raw predictions.
    sources: per branch, per level, (S_l,) local index of each tile's source image.
    targets_per_branch: per branch, (B, D) target embeddings of this rank's full images (ratio 1).
    weights: (4,) level weights on the device.
    Branch 1's tiles are scored against branch 2's targets from all ranks and vice versa (the
    pairing is the `1 - branch` below); labels are global indices, local index + rank·B. Returns
    (weighted total, per-level losses (4,), summed over both branches as the official code)."""
    B = targets_per_branch[0].shape[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    targets = [common.concat_all_gather(F.normalize(t.float(), dim=1)) for t in targets_per_branch]  # 2 x (N, D)
    per_level = torch.zeros(len(RATIOS), device=weights.device)
    for branch in (0, 1):
        for level, (pred, src) in enumerate(zip(preds[branch], sources[branch])):  # 8 groups, not images or tiles
            pred = F.normalize(pred.float(), dim=1)
            per_level[level] += level_loss(pred, targets[1 - branch], src + rank * B, temperature)
    return (per_level * weights).sum(), per_level


# =================================================================================================
# Train step
# =================================================================================================
def lr_schedule(args, steps_per_epoch):
    """The official schedule (mmcv CosineAnnealing, by iteration, linear warm-up): a cosine from the
    base lr to --min-lr over *all* iterations, multiplied during the warm-up by a factor rising
    linearly from --warmup-ratio to 1."""
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    k = np.arange(total)
    cosine = args.min_lr + 0.5 * (args.scaled_lr - args.min_lr) * (1 + np.cos(np.pi * k / total))
    ramp = np.where(k < warmup, 1 - (1 - k / max(warmup, 1)) * (1 - args.warmup_ratio), 1.0)
    return (cosine * ramp).tolist()


@torch.no_grad()
def ema_update(target_params, online_params, m):
    """target <- m·target + (1 - m)·online, one fused foreach kernel."""
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)


class State(NamedTuple):
    """What an MCL step reads and updates, besides its views."""
    student: nn.Module  # the online network and the predictors, as trained (DDP / torch.compile wrap it)
    target: nn.Module  # an EMA of the online network, never trained by gradients
    online: nn.Module  # the online network itself (what the target follows), inside the student
    level_weights: torch.Tensor  # (4,) loss weight per level, on the device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(views, s, momentum, args):
    """One MCL iteration at target EMA `momentum`: the montages of both branches, the student on them,
    the target's P5 of the full views, the multi-level loss, clipping, the optimizer step, then the
    target's EMA. Returns the total and the four per-level losses, (5,) (no host sync)."""
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    views = [v.to(s.device, non_blocking=True) for v in views]  # 8 x (B, 3, H, W): crops 0-3 branch 1, 4-7 branch 2
    B = views[0].shape[0]
    c1, plan, src1 = build_montages(views[:4], args.montages, args.tile_resize)  # plan is the same for both
    c2, _, src2 = build_montages(views[4:], args.montages, args.tile_resize)
    c1, c2 = c1.contiguous(memory_format=memory_format), c2.contiguous(memory_format=memory_format)
    with common.autocast(s.device, s.dtype):
        preds = s.student((c1, c2), plan)  # per branch, per level: (S_l, 256)
        with torch.no_grad():  # the target sees each branch's montages too (its BN statistics), uses P5 of ratio 1
            t_full = [s.target.forward_p5(c)[:B] for c in (c1, c2)]  # 2 x (B, 256)
    loss, per_level = multi_level_loss(preds, (src1, src2), t_full, s.level_weights, args.temperature)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.optimizer)
    if args.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(s.student.parameters(), args.clip_grad, foreach=True)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    ema_update(list(s.target.parameters()), list(s.online.parameters()), momentum)  # after the step, as the BYOLHook
    return torch.cat([loss.detach().view(1), per_level.detach()])


# =================================================================================================
# Main
# =================================================================================================
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)  # the same initial weights on every rank
    out = common.prepare_output(args, __file__)
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)

    loader, device_views = build_data(args, device)
    if args.save_montage:
        common.seed_everything(args.seed)
        views = next(iter(loader))
        save_montage_png(device_views(views, device) if device_views is not None else views, args, args.save_montage)
        common.print0(f"wrote {args.save_montage}: one montage per ratio {RATIOS}, counts per process {args.montages}")
        return None
    steps_per_epoch = len(loader)
    lrs = lr_schedule(args, steps_per_epoch)
    m_schedule = common.momentum_schedule(args.base_momentum, args.epochs, steps_per_epoch)
    common.print0(f"MCL | {args.arch} {args.image_size}px | montages per ratio {args.montages} | {world} x "
                  f"{args.batch_per_rank} images | lr {args.scaled_lr:g} | head on {args.head_windows} windows | "
                  f"{args.epochs} epochs x {steps_per_epoch} steps | {common.precision_name(dtype)} | device {device} | "
                  f"output {out}")

    student = Student(args.arch, args.head_windows)
    param_groups = official_param_groups(student)  # by module type, before SyncBN conversion renames the types
    student = common.sync_batchnorm(student, True).to(device)
    target = copy.deepcopy(student.online).requires_grad_(False)  # the "target" network of BYOL/MCL (EMA)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
        target.to(memory_format=torch.channels_last)
    # Every rank starts from the same weights (seeded above); from here on each rank draws its own
    # random numbers (crops, montage slots), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    optimizer = common.LARS(param_groups, lr=args.scaled_lr, weight_decay=args.weight_decay, form="openselfsup")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"student": student, "target": target}, optimizer, scaler, args, log, steps_per_epoch,
                       device, rest_name="level_losses")  # resumes here if a checkpoint exists
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    level_weights = torch.tensor(args.level_weights, device=device)  # once, not a host-to-device copy per step
    s = State(torch.compile(model) if args.compile else model, target, student.online, level_weights, optimizer, scaler,
              dtype, device)

    for epoch, views in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> the method's views, on the device
            views = device_views(views, device)
        lr, momentum = lrs[loop.step], m_schedule[loop.step]
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = train_step(views, s, momentum, args)  # (5,): the total, then one per level
        loop.end_step(losses, lr, momentum=momentum)
    loop.save()
    # Downstream uses the online network (backbone, FPN and the region head's 4 convs), as MCL's converter.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "mcl", args.arch, student.online.encoder, student.online.fpn,
                               student.online.fpn.config,
                               extra={"region_head_convs": {k: v.detach().cpu() for k, v in student.online.head.convs.state_dict().items()}})
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return student, target


if __name__ == "__main__":
    main()
