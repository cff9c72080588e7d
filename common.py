"""Shared plumbing of the method files: everything a method file calls that is not the method.

`cp densecl.py common.py elsewhere/` is the whole method, every flag included. Nothing here is a
method: queues, momentum updates, matching and losses live in the method files, so that each one
reads on its own. What only the evaluation or the benchmarks use lives with them (evaluation/,
benchmarks/), not here.

Contents (one banner section each, in this order):
 1. Distributed (torchrun) helpers    torchrun_world, init_distributed, fail, is_main, print0, world_size,
                                      concat_all_gather, sync_batchnorm
 2. Shuffle BN in one process         add_bn_splits_arg, check_bn_splits, SplitBatchNorm2d, split_batchnorm
 3. Backbones                         RESNET_ARCHS, ResNetTrunk (C2-C5), FPN, ViT (Attention, Block,
                                      drop_path), VIT_ARCHS
 4. Synthetic scenes                  synthetic_scene, SyntheticScenes, SYNTHETIC_CLASSES
 5. Image folders (--data presets)    add_data_args, build_pretrain_dataset, ImageFiles, WarnOnce, open_rgb,
                                      find_images, count_by_subfolder, resolve_image_folders, default_data_root,
                                      DATA_LAYOUTS
 6. Augmentations on the CPU          moco_v2_augmentation, byol_augmentations, TwoViews, blur_kernel
 7. Augmentations on the device       DecodeOnly, pad_collate (workers); device_images, crop_params,
    (--gpu-augment)                   resized_crops, device_crops, device_colour, MOCO_COLOUR,
                                      BYOL_COLOUR, MoCoV2Views (device)
 8. Loaders                           make_loader, ResumableSampler, SeededSamples
 9. Schedules, LARS, precision        cosine_schedule, momentum_schedule, LARS, lars_param_groups,
                                      amp_dtype, precision_name, autocast, fp32, seed_everything
10. Arguments                         split_batch, add_run_args, check_args, check_image_size
11. Logging, stop signals, divergence progress, format_rate, JsonLog, mean_over_ranks, catch_stop_signals,
                                      stop_requested, exit_on_signal, check_finite
12. Output folder and checkpoints     prepare_output, check_writable, lock_output, release_lock,
                                      write_run_record, save_checkpoint, save_atomic, resume, NEUTRAL_ARGS,
                                      load_checkpoint, CheckpointError, save_downstream
13. The loop's plumbing              Loop: resume, epochs and bars, logging, checks, saving, stop signals
"""
import argparse
import atexit
import datetime
import errno
import functools
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.ops import roi_align
from torchvision.transforms import v2
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The run's process-wide state: the stop signal received (and the process that handles it), the
# group the ranks agree on it over, the steps last saved per checkpoint, the script to copy.
_RUN = {"stop": 0, "pid": None, "cpu_group": None, "saved": {}, "script": None}


# =================================================================================================
# 1. Distributed (torchrun) helpers
# =================================================================================================
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE
RENDEZVOUS_NOTICE_S = 10  # a rendezvous that takes longer says that it waits, and for whom


def torchrun_world():
    """WORLD_SIZE, once checked that torchrun's other variables come with it: a job script that
    exports WORLD_SIZE alone would make a plain `python x.py` fail (or wait) for ranks never started."""
    try:
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise SystemExit(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes: unset it for one "
                         f"process, or launch with torchrun") from None
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if world > 1 and missing:
        raise SystemExit(f"WORLD_SIZE={world} is set, but not {', '.join(missing)}: an incomplete torchrun "
                         f"environment (exported by a job script?). Launch with `torchrun --nproc_per_node={world} "
                         f"{Path(sys.argv[0]).name} ...`, or unset WORLD_SIZE for one process.")
    return world


def init_distributed():
    """Join the torchrun process group if WORLD_SIZE > 1 (with RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT); return (rank, world, device). $DIST_TIMEOUT (seconds, default 600, torch's NCCL
    default) bounds the wait for all ranks to meet, and every collective after it."""
    world = torchrun_world()
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = float(os.environ.get("DIST_TIMEOUT", 600))
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        notice = threading.Timer(RENDEZVOUS_NOTICE_S, print, [
            f"rank {rank}: waiting for all {world} processes to meet at {where} (gives up after DIST_TIMEOUT="
            f"{timeout:g} s)"], {"file": sys.stderr, "flush": True})
        notice.daemon = True
        if local_rank == 0:  # one line per node
            notice.start()
        try:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # the store's timeout (DistStoreError), a bad address or port
            fail(f"rank {rank}: the {world} processes did not all meet at {where} within DIST_TIMEOUT={timeout:g} s "
                 f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}). Check that every rank was "
                 f"started (torchrun --nnodes, --nproc_per_node) and that MASTER_ADDR is reachable from every node.")
        finally:
            notice.cancel()
        # the ranks agree on stop signals every step over this CPU group: no GPU synchronisation
        _RUN["cpu_group"] = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return rank, world, device


def fail(message):
    """Stop the run with `message` (SystemExit), printed by one process per node: under torchrun every
    rank meets the same bad input, and the ranks of one node see the same files (a node whose files
    differ still says so). The other ranks exit with status 1, silently."""
    raise SystemExit(message if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 1)


def is_main():
    """True on rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x):
    """Concatenate `x` (B, ...) from all ranks along dim 0 -> (world*B, ...); no gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sync_batchnorm(model, enabled):
    """Convert BatchNorm to SyncBatchNorm when `enabled` under DDP on CUDA (PyTorch has no CPU SyncBN)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if enabled and world_size() > 1 and torch.cuda.is_available() else model


# =================================================================================================
# 2. Shuffle BN in one process (MoCo v2, DenseCL, DeCon over DenseCL)
# =================================================================================================
def add_bn_splits_arg(parser):
    """--bn-splits, for the methods with shuffle BN (MoCo v2, DenseCL, DeCon over DenseCL)."""
    parser.add_argument("--bn-splits", type=int, default=8,
                        help="one process only: shuffle BN emulated with this many groups of the batch, each with its "
                             "own BatchNorm statistics, the key batch shuffled across them (as the official MoCo Colab "
                             "demo; 8 = the papers' 8 GPUs); 1 = one BatchNorm over the whole batch, no shuffle. Under "
                             "torchrun every process is one group, shuffled across processes (the official shuffle BN)")


def check_bn_splits(parser, args):
    """In one process the batch must split into --bn-splits groups of at least 2 images (after
    split_batch; check_args has refused --bn-splits < 1)."""
    b = args.batch_size
    if args.world_size == 1 and (b % args.bn_splits or b // args.bn_splits < 2):
        fit = max([g for g in range(1, 9) if b % g == 0 and b // g >= 2], default=1)
        parser.error(f"--batch-size {b} does not split into --bn-splits {args.bn_splits} BatchNorm groups of at least "
                     f"2 images each: pick a --bn-splits that divides the batch with 2+ images per group (e.g. "
                     f"--bn-splits {fit}: {b // fit} images each), or 1 for one BatchNorm over the batch (no shuffle BN)")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` groups of the batch taken apart, as
    `splits` processes would each compute them: one process emulates shuffle BN's per-GPU BatchNorm
    (MoCo's official Colab demo, colab/moco_cifar10_demo.ipynb, does the same with bn_splits 8).
    Group g is the g-th of `splits` equal consecutive slices of the batch: views in any memory format
    (the demo's reshape to (N/G, G*C) copies a channels_last batch, and was slower on a CPU too).
    The running statistics move by the mean of the groups' statistics. Same parameters and buffers
    as nn.BatchNorm2d, so checkpoints are interchangeable; in eval mode it is nn.BatchNorm2d."""

    def __init__(self, num_features, splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x):  # (N, C, H, W), N a multiple of splits
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        stats = [(self.running_mean.clone(), self.running_var.clone()) for _ in range(self.splits)]  # one per group
        y = torch.cat([nn.functional.batch_norm(part, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
                       for part, (mean, var) in zip(x.chunk(self.splits), stats)])  # (N, C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack([mean for mean, _ in stats]).mean(0))
            self.running_var.copy_(torch.stack([var for _, var in stats]).mean(0))
        return y


def split_batchnorm(module, splits):
    """Replace every nn.BatchNorm2d in `module` by a SplitBatchNorm2d with the same state (call it before
    moving `module` to its device); returns `module`. Every one must track running statistics with a
    fixed momentum (PyTorch's default), as every BatchNorm of the networks here does."""
    if splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if not child.track_running_stats or child.momentum is None:
                raise ValueError(f"{name}: split BatchNorm needs running statistics with a fixed momentum")
            split = SplitBatchNorm2d(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, splits)
    return module


# =================================================================================================
# 3. Backbones: ResNet trunk, FPN, ViT
# =================================================================================================
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # the --arch choices of the ResNet files


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc, keeping torchvision's parameter names.

    forward returns C5 (B, C, H/32, W/32), or with pyramid=True the list [C2, C3, C4, C5] of
    strides 4, 8, 16, 32.
    """

    def __init__(self, arch="resnet50", pyramid=False, conv_init="fan_out", zero_init_residual=False):
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"--arch {arch}: expected one of {', '.join(RESNET_ARCHS)}")
        # torchvision's init (kaiming normal, fan_out) is MoCo's and SlotCon's; OpenSelfSup's ResNet
        # (DenseCL, MCL) uses fan_in. SlotCon also zeroes the last BN gamma of every residual block.
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if conv_init == "fan_in":
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif conv_init != "fan_out":
            raise ValueError(f"conv_init {conv_init}: expected fan_out (torchvision) or fan_in (OpenSelfSup)")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.pyramid, self.arch = pyramid, arch
        self.channels = [m[-1].conv3.out_channels if hasattr(m[-1], "conv3") else m[-1].conv2.out_channels
                         for m in (self.layer1, self.layer2, self.layer3, self.layer4)]
        self.out_channels = self.channels[-1]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5] if self.pyramid else c5


class FPN(nn.Module):
    """Feature pyramid over [C2..C5], sum fusion, BN, no top block (Lin et al. 2017).

    lateral[i]: 1x1 conv + BN on C(i+2); output["pN"]: 3x3 conv + BN on the fused map of level N,
    built only for `levels` (DeCon-SL keeps P2 only). The names map one to one onto detectron2's
    fpn_lateral{i+2} / fpn_outputN (eval_dense.py --export). forward returns the maps of `levels`.
    skip_dropout drops the lateral (skip) maps of C2-C4 before the top-down sum during training:
    "channel" zeroes whole channels (Dropout2d), "map" drops a whole lateral map (DeCon).
    Any module in train mode drops out, so the teacher / key decoder of decon.py and decon_densecl.py
    (deep copies of the student, never put in eval mode) drop their own maps too, with coins of their own. Each rank draws its own coins from its
    own torch generator (seeded seed + rank), so ranks drop different maps in the same step.
    """

    def __init__(self, in_channels, out_channels=256, levels=("p2", "p3", "p4", "p5"), skip_dropout=0.0,
                 skip_drop_mode="channel"):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
                                     for c in in_channels)
        self.output = nn.ModuleDict({lv: nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                                       nn.BatchNorm2d(out_channels)) for lv in levels})
        self.levels, self.skip_dropout, self.skip_drop_mode = list(levels), skip_dropout, skip_drop_mode
        self.config = {"type": "fpn", "in_channels": list(in_channels), "out_channels": out_channels, "levels": list(levels)}

    def drop_skip(self, x):
        """Skip-connection dropout (training only): whole channels (Dropout2d, rescaled), or "map":
        one draw per level and forward that drops this lateral map for the whole batch, not rescaled
        (DeCon's whole-map mode). As the DeCon authors' FPN, the map is multiplied by a 0/1 coin
        drawn on the device: a dropped lateral stays in the graph with a zero gradient, which DDP
        (without find_unused_parameters) needs, and no host sync is made."""
        if not self.training or self.skip_dropout == 0:
            return x
        if self.skip_drop_mode == "channel":
            return nn.functional.dropout2d(x, self.skip_dropout, training=True)
        keep = torch.rand(1, device=x.device) >= self.skip_dropout  # (1,) one coin for the whole batch
        return x * keep.to(x.dtype)

    def forward(self, feats):  # [C2..C5] -> [P_level for level in levels], each (B, out, H_i, W_i)
        top = self.lateral[-1](feats[-1])
        fused = {f"p{len(feats) + 1}": top}
        for i in range(len(feats) - 2, -1, -1):
            lat = self.drop_skip(self.lateral[i](feats[i]))
            top = lat + nn.functional.interpolate(top, size=lat.shape[-2:], mode="nearest")
            fused[f"p{i + 2}"] = top
        return [self.output[lv](fused[lv]) for lv in self.levels]


VIT_ARCHS = {  # name: (embed dim, depth, heads)
    "vit_micro": (96, 4, 3),  # for CPU tests and demos
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class Attention(nn.Module):
    """Multi-head self-attention on scaled_dot_product_attention; mask: (L, L) bool, True = may attend."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, d)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): zero a residual branch for whole samples with
    probability p and rescale the kept ones by 1/(1-p); identity in eval mode or at p = 0."""
    if p == 0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)  # (B, 1, 1)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); drop_path on both branches."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim)
        self.drop_path = drop_path

    def forward(self, x, mask=None):
        x = x + drop_path(self.attn(self.norm1(x), mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) with a CLS token and learned positional embeddings.

    Parameter names follow timm/DINO (patch_embed.proj, cls_token, pos_embed, blocks.i.norm1,
    blocks.i.attn.qkv, blocks.i.attn.proj, blocks.i.norm2, blocks.i.mlp.fc1/fc2, norm), so DINO and
    timm ViT state dicts load with strict=True. forward(x) returns all normalised tokens (B, 1 + N, D);
    a method that adds tokens of its own runs embed, pos_for, the blocks (each takes an optional
    (L, L) bool attention mask, True = may attend) and norm itself (adclr.py). Other image sizes interpolate the
    positional embedding as DINO does. drop_path_rate: stochastic depth rising linearly over the
    blocks from 0 (DINO's student: 0.1).
    """

    def __init__(self, arch="vit_small", patch_size=16, img_size=224, drop_path_rate=0.0):
        super().__init__()
        if arch not in VIT_ARCHS:
            raise ValueError(f"--arch {arch}: expected one of {', '.join(VIT_ARCHS)}")
        dim, depth, heads = VIT_ARCHS[arch]
        self.arch, self.patch_size, self.embed_dim = arch, patch_size, dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        rates = np.linspace(0, drop_path_rate, depth).tolist()  # DINO's per-block rates
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x):
        """Patch embedding without position: (B, 3, H, W) -> (B, H/p · W/p, D)."""
        return self.patch_embed.proj(x).flatten(2).transpose(1, 2)

    def pos_for(self, h, w):
        """Positional embedding (1, 1 + h·w, D) for an h x w patch grid, as DINO's
        interpolate_pos_encoding: bicubic with scale factor (h + 0.1) / side (the 0.1 keeps the
        floor of the output size at h), so local crops get exactly DINO's embeddings."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        side = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = nn.functional.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                                         align_corners=False)  # (1, D, h, w)
        assert grid.shape[-2:] == (h, w), grid.shape
        return torch.cat([self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos_for(h, w)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)


# =================================================================================================
# 4. Synthetic scenes: procedurally generated images with per-pixel labels
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
    shapes (docs/miniature.md: the first scenes on which MoCo v2 rises in every seed).
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
# 5. Image folders: the --data presets
# =================================================================================================
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
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
    """Sorted list of image files below `folder` (recursive, by extension). Symlinked folders are
    followed (ImageNet subsets are usually built from links to class folders), each real folder
    once, so that a link loop (`ln -s . loop`) ends and a folder linked twice is not counted twice."""
    seen, files = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()  # the first path to a folder reached twice is the same in every run
        files += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def count_by_subfolder(folders, files):
    """' (a/: 6, b/: 16)': the images per top-level subfolder (per folder for several --data folders)
    when there are several, so that a class folder or a link with fewer images than expected shows;
    with more than 12, the range and the smallest. '' for one."""
    counts = {}
    for folder in map(str, folders):
        prefix = os.path.join(folder, "")
        for f in files:
            if f.startswith(prefix):
                rest = f[len(prefix):]
                key = folder if len(folders) > 1 else rest.split(os.sep)[0] + "/" if os.sep in rest else "./"
                counts[key] = counts.get(key, 0) + 1
    if len(counts) <= 1:
        return ""
    if len(counts) <= 12:
        return f" ({', '.join(f'{k}: {n}' for k, n in counts.items())})"
    fewest = min(counts, key=counts.get)
    return f" in {len(counts)} subfolders, {counts[fewest]} to {max(counts.values())} each (fewest: {fewest})"


def resolve_image_folders(data, data_root):
    """The list of image folders a --data value points at, with a clear error when one is missing."""
    if data in DATA_LAYOUTS:
        folders = [Path(data_root) / sub for sub in DATA_LAYOUTS[data]]
        expected = LAYOUT_HELP[data]
    else:
        folders, expected = [Path(data)], f"{data}/**/*.jpg (any folder of images, searched recursively)"
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            fail(f"--data {data}: {folder} is a file, not a folder. Give the folder that holds the images "
                 f"({expected}), or use --data synthetic.")
        if not folder.is_dir():
            fail(f"--data {data}: folder {folder} does not exist. Expected layout: {expected}. "
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


class WarnOnce:
    """warn_once(key, message): one warning per key for the whole run, whatever the number of loader
    workers (they share a folder of markers made with O_EXCL; the process that made it removes it)."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="dense-ssl-warned-")
        weakref.finalize(self, _remove_folder_of, self.folder, os.getpid())  # not left behind in /tmp

    def __call__(self, key, message):
        marker = os.path.join(self.folder, str(abs(hash(key))))
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # only the first process to see the key warns
        except FileExistsError:
            return
        warnings.warn(message)


class ImageFiles(Dataset):
    """Images from a list of files; an unreadable image is skipped for the next, with one warning per
    file for the whole run. An image smaller than `min_side` (the crop) both ways warns once for the
    run: its crops are upsampled (a 1 x 1 image gives flat views)."""

    def __init__(self, files, transform=None, min_side=0):
        self.files, self.transform, self.min_side, self.warn_once = files, transform, min_side, WarnOnce()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for attempt in range(len(self.files)):
            path = self.files[(i + attempt) % len(self.files)]
            try:
                img = open_rgb(path)
                break
            except Exception as e:  # corrupt, truncated or unreadable: never stop the run for one file
                self.warn_once(path, f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        else:
            raise RuntimeError("no readable image in the dataset")
        if max(img.size) < self.min_side:  # the whole image fits inside one crop
            self.warn_once("small", f"{path} is {img.width} x {img.height} px, smaller than the {self.min_side}-px "
                                    f"crop: its crops are upsampled (this warning is shown once; other images may be "
                                    f"small too)")
        return self.transform(img) if self.transform else img


def build_pretrain_dataset(args, transform, crop=None):
    """The pre-training dataset for --data (synthetic, coco, coco+, imagenet, or a folder path).
    `crop`: the largest crop the method takes (default --image-size): synthetic scenes are drawn
    8/7 of it, and an image smaller than it is warned about."""
    crop = crop or args.image_size
    if args.data == "synthetic":
        return SyntheticScenes(args.synthetic_len, args.synthetic_size or crop * 8 // 7,
                               seed=args.seed, transform=transform, style=args.synthetic_style)
    folders, expected = resolve_image_folders(args.data, args.data_root)
    files = [f for folder in folders for f in find_images(folder)]
    if not files:
        fail(f"--data {args.data}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
             f"{', '.join(map(str, folders))}. Expected layout: {expected}.")
    print0(f"--data {args.data}: {len(files)} images" + count_by_subfolder(folders, files))
    first_error = None
    for path in files:  # one readable image is enough to start (usually the first); none is an error now,
        try:            # not a crash in a loader worker later
            open_rgb(path)
            break
        except Exception as e:
            first_error = first_error or f"{path}: {type(e).__name__}: {e}"
    else:
        fail(f"--data {args.data}: none of the {len(files)} image files below "
             f"{', '.join(map(str, folders))} can be read (the first: {first_error}).")
    return ImageFiles(files, transform, min_side=crop)


SYNTHETIC_LEN = 10000  # scenes per epoch of --data synthetic


def default_output_dir(method, data):
    """A run's folder when --output-dir is not given: runs/<method> on the synthetic scenes,
    runs/<method>-<preset or folder name> on other data, so that runs on other data never meet."""
    if data == "synthetic":
        return f"runs/{method}"
    return f"runs/{method}-{Path(os.path.abspath(data)).name or 'data'}"


def add_data_args(parser):
    """The --data/--data-root/--synthetic-* flags every method file shares."""
    parser.add_argument("--data", default="synthetic",
                        help="synthetic (built in, no download) | coco | coco+ | imagenet | a folder of images")
    parser.add_argument("--data-root", default=default_data_root(), help="root of the presets ($DATA_ROOT or ./data)")
    parser.add_argument("--synthetic-len", type=int, default=None,
                        help=f"images per epoch of --data synthetic (default {SYNTHETIC_LEN}); ignored with a folder")
    parser.add_argument("--synthetic-size", type=int, default=0, help="side of a synthetic scene (0: 8/7 of --image-size)")
    parser.add_argument("--synthetic-style", default="colour", choices=SCENE_STYLES,
                        help="synthetic scenes in colour, or mono: grey background, dark and light grey objects")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers per process")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="the workers only decode; crops, colour, blur and flips run on the device (common.py, section 7)")
    parser.add_argument("--max-side", type=int, default=512, help="--gpu-augment: images shrunk to this long side first")


# =================================================================================================
# 6. Augmentations on the CPU (torchvision.transforms.v2), in the data workers
# =================================================================================================
def _to_tensor_normalised():
    """PIL image -> float tensor in [0, 1] -> ImageNet normalisation."""
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


# =================================================================================================
# 7. Augmentations on the device (--gpu-augment): the workers only decode
# =================================================================================================
# Why: a ResNet-50 step on an H100 consumes more images per second than 16 CPU cores can decode *and*
# augment (docs/performance.md: about 36 images/s of MoCo v2's two views per core). Decoding alone
# is the cheaper part; --gpu-augment moves the rest to the accelerator:
#
#     workers:  DecodeOnly      PIL image -> uint8 (3, h, w), long side capped at --max-side
#     collate:  pad_collate     -> uint8 (B, 3, H, W) padded, sizes (B, 2)
#     device:   MoCoV2Views     -> two views, as moco_v2_augmentation (moco, densecl, decon_densecl);
#               decon.py, mcl.py and adclr.py build their own views from the parts below,
#               next to their CPU pipelines
#
# The same distribution as the PIL/v2 pipeline, computed differently (tests/test_gpu_augment.py
# checks both): RandomResizedCrop parameters are drawn exactly as torchvision's get_params (10 tries,
# then the centre-crop fallback), vectorised; the crop and resize is one roi_align with an adaptive
# sampling grid (a box filter where PIL's bilinear uses a triangle when shrinking: equal within
# interpolation tolerance); colour jitter applies brightness, contrast, saturation and hue in a
# random order per sample, with torchvision's tensor formulas (PIL works in uint8, rounding after
# each step); grayscale with torchvision's weights; Gaussian blur with a per-sample sigma, the same
# kernel size (blur_kernel) and reflect padding. Random numbers come from the device's default
# generator, whose state the checkpoints save, so a resumed run sees the same views. Deviations:
# images larger than --max-side (default 512) are shrunk by the workers first, so that a batch pads
# to a bounded size; crops are resized bilinearly, also where the CPU pipelines use bicubic
# (SlotCon/DeCon and DINO/ADCLR crops): roi_align has no bicubic mode.
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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
    """(N, 3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1), as torchvision's tensor formula."""
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
    """The inverse of rgb_to_hsv."""
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
    """Hue rotated by `shift` (N, 1, 1, 1) of a turn."""
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


def device_colour(x, strength, p_jitter, p_gray, p_blur, p_solarize, kernel):
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
    """ImageNet mean/std normalisation of (N, 3, H, W) in [0, 1]."""
    return (x - x.new_tensor(IMAGENET_MEAN)[:, None, None]) / x.new_tensor(IMAGENET_STD)[:, None, None]


def device_crops(images, sizes, n, size, scale, flip_p=0.5):
    """n crops of every image: (n·B, 3, size, size) in [0, 1] (crop k of image b at k·B + b), their
    boxes (n·B, 4) in [0, 1] image units and flips (n·B,)."""
    boxes = crop_params(sizes.float().repeat(n, 1), scale)  # (n·B, 4) pixels
    x = resized_crops(images, boxes, size)
    flips = torch.rand(len(boxes), device=boxes.device) < flip_p
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x, boxes / sizes.float().flip(1).repeat(n, 2), flips


def device_images(batch, device):
    """A pad_collate batch on the device: images (B, 3, H, W) as floats in [0, 1], sizes (B, 2)."""
    images, sizes = batch
    return images.to(device, non_blocking=True).float().div_(255), sizes.to(device)  # (B, 3, H, W) in [0, 1]


MOCO_COLOUR = dict(strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2)
BYOL_COLOUR = dict(strength=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2)


class MoCoV2Views:
    """moco_v2_augmentation on the device: two views of every image of a decoded batch.
    Crop (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur 0.5, flip 0.5."""

    def __init__(self, size, scale=(0.2, 1.0)):
        self.size, self.scale, self.kernel = size, scale, blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = device_images(batch, device)
        x, _, _ = device_crops(images, sizes, 2, self.size, self.scale)  # (2B, 3, S, S): view 1, then view 2
        x = device_colour(x, **MOCO_COLOUR, p_blur=0.5, p_solarize=0.0, kernel=self.kernel)
        return list(x.split(len(images)))  # [view 1 (B, 3, S, S), view 2]


# =================================================================================================
# 8. Loaders: resumable, every sample's randomness seeded
# =================================================================================================
class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (after `skip` of this rank's samples) and
    yields (epoch, index) pairs, so that SeededSamples can make each sample's randomness depend on
    (seed, rank, epoch, index) alone."""

    skip = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return super().__len__() - self.skip


class SeededSamples(Dataset):
    """dataset[(epoch, i)]: sample i with Python, NumPy and torch seeded from (seed, rank, epoch, i)
    while its augmentations are drawn, then the previous RNG states restored. A resumed run, any
    number of loader workers and an uninterrupted run therefore see bit-identical views, and the
    training step's own random draws do not depend on the loader."""

    def __init__(self, dataset, seed, rank):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = int(np.random.SeedSequence([self.seed, self.rank, epoch, i]).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)  # the CPU's only: torch.manual_seed would also reseed the GPUs'
        try:
            return self.dataset[i]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def make_loader(dataset, batch_size, workers, seed, device, collate_fn=None):
    """Training DataLoader: per-rank batches, shuffled by epoch, last partial batch dropped; every
    sample's augmentation seeded from (seed, rank, epoch, index) (SeededSamples). The loader draws
    its own base seed from a private generator, not from the global RNG the checkpoint restores."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = ResumableSampler(dataset, num_replicas=world_size(), rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(SeededSamples(dataset, seed, rank), batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed + rank))
    if len(loader) == 0:
        more = "raise --synthetic-len" if isinstance(dataset, SyntheticScenes) else "add images"
        fail(f"{len(dataset)} images are fewer than one global batch of {batch_size * world_size()}: "
             f"lower --batch-size or {more}")
    left = len(dataset) - len(loader) * batch_size * world_size()
    if left:  # drop_last, as the official loaders: say it, a small folder loses a visible share
        print0(f"an epoch is {len(dataset)} // {batch_size * world_size()} = {len(loader)} steps: {left} of the "
               f"{len(dataset)} images sit out each epoch (a new random set each epoch)")
    return loader


# =================================================================================================
# 9. Schedules, LARS, mixed precision, seeding
# =================================================================================================
def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0, per_step=True,
                    warmup_endpoint=False):
    """Per-step values: a linear warm-up from `warmup_start`, then a cosine from `base` to `final`
    (per step, or held over each epoch), final + (base - final)(1 + cos(pi k / K)) / 2 for step k of
    the K after the warm-up. Warm-up step t of W: start + (base - start)·t / W (SlotCon's form,
    ending one step short of base), or with warmup_endpoint=True start + (base - start)·t / (W - 1)
    (DINO's utils.cosine_scheduler, np.linspace with the endpoint: its last step is base)."""
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    steps = np.arange(total - warmup) if per_step else np.arange(total - warmup) // steps_per_epoch * steps_per_epoch
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(total - warmup, 1)))
    return np.concatenate([np.linspace(warmup_start, base, warmup, endpoint=warmup_endpoint), decay]).tolist()


def momentum_schedule(base, epochs, steps_per_epoch):
    """Per-step EMA momentum, cosine from `base` to 1 (BYOL): 1 - (1 - base)(cos(pi k / K) + 1) / 2."""
    return cosine_schedule(base, 1.0, epochs, steps_per_epoch)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), in the two forms of
    the official codes. Groups with lars_exclude=True get plain momentum SGD (their weight_decay is
    set by the caller, 0 in both codes).

    form="slotcon" (SlotCon's utils/lars.py, from Barlow Twins): d = g + wd·w, trust
        q = eta·|w| / |d|; mu = m·mu + q·d; w -= lr·mu (the lr multiplies the buffer).
    form="openselfsup" (MCL's openselfsup/utils/optimizers.py): trust q = eta·|w| / (|g| + wd·|w|);
        mu = m·mu + lr·q·(g + wd·w); w -= mu (the lr is inside the buffer, so a schedule reaches the
        step through the momentum).
    Zero norms, as each code: SlotCon's gives q = 1 when |w| = 0 or |d| = 0. OpenSelfSup's formula
    has no guard: |w| = 0 gives q = 0 (a zero weight stays zero), |g| = 0 gives eta / wd; only a zero
    denominator (|g| = 0 and wd·|w| = 0, where the step is zero whatever q) would divide by zero in
    that code, and gives q = 1 here.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001, form="slotcon"):
        if form not in ("slotcon", "openselfsup"):
            raise ValueError(f"LARS form {form}: expected slotcon or openselfsup")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))
        self.form = form

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm = torch.norm(p)
                    if self.form == "slotcon":
                        d_norm = torch.norm(d)
                        q = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    else:
                        denom = torch.norm(p.grad) + g["weight_decay"] * w_norm
                        q = torch.where(denom > 0, g["eta"] * w_norm / denom, torch.ones_like(w_norm))
                    d = d.mul(q)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                if self.form == "slotcon":
                    buf.mul_(g["momentum"]).add_(d)
                    p.add_(buf, alpha=-g["lr"])
                else:
                    buf.mul_(g["momentum"]).add_(d, alpha=g["lr"])
                    p.sub_(buf)


def lars_param_groups(model):
    """Two groups: weights (decay + LARS) and biases/norm parameters (excluded), as BYOL."""
    decay, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": excluded, "lars_exclude": True, "weight_decay": 0.0}]


def precision_name(dtype):
    """The precision a run uses, in words (for the start line)."""
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]


def amp_dtype(amp, device):
    """The autocast dtype for --amp (auto: bf16 on CUDA, none on CPU) or None for fp32."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def autocast(device, dtype):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def fp32(fn):
    """Decorator for losses and matching: autocast off and floating tensor arguments cast to fp32, so
    that the value is the fp32 one even when the call sits inside an autocast region (under bf16
    autocast a matmul of logits over 65536 keys moves a loss by about 1e-2). Tensors inside a list
    argument are not cast: the function casts them itself."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        cast = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x
        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return run


def seed_everything(seed):
    """Seed Python, NumPy and torch (each rank should pass seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# =================================================================================================
# 10. Arguments shared by every method file
# =================================================================================================
def split_batch(parser, args):
    """Set args.world_size (from torchrun) and args.batch_per_rank; --batch-size is the global batch."""
    args.world_size = torchrun_world()
    if args.batch_size % args.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {args.world_size} processes")
    args.batch_per_rank = args.batch_size // args.world_size


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none (None) or the help says it."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_run_args(parser, epochs, batch_size, epochs_help=None):
    """Flags shared by every training loop: schedule length, batch, precision, logging, output. Under
    torchrun, a bad flag is reported by one process per node (see fail); the others exit with 2."""
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:
        parser.error = lambda message: sys.exit(2)
    parser.add_argument("--epochs", type=int, default=epochs,
                        help=epochs_help or "training epochs (the file's recipe: its docstring says whose)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="global batch over all processes (the file's recipe); the lr follows its scaling rule")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; fp16 adds a GradScaler "
                             "(GPUs without bf16, e.g. V100); the losses always run in fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the trained network (the student / query network, heads included; "
                             "CUDA; slower start)")
    parser.add_argument("--seed", type=int, default=0,
                        help="weights, queues and data order; every rank adds its rank for its own augmentations")
    parser.add_argument("--log-every", type=int, default=20, help="steps between logged losses (a host sync)")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (also every epoch)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps in total (0: write the initial weights only)")
    parser.add_argument("--allow-arg-changes", action="store_true",
                        help="resume although arguments that change the result differ from the checkpoint's "
                             "(e.g. a lower --lr after a divergence)")


def check_args(parser, args, positive=(), non_negative=()):
    """Refuse values that would train silently wrong or crash later, with the valid range. Checks
    that no float flag is NaN or infinite, then the shared run flags and the method's own
    `positive` (> 0) and `non_negative` (>= 0) flags; a flag left at None (a derived default) is
    not checked."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                parser.error(f"--{name.replace('_', '-')} {v}: must be a finite number")
    if hasattr(args, "synthetic_len"):  # --synthetic-len: the scenes per epoch of --data synthetic only
        if args.data != "synthetic" and args.synthetic_len is not None:
            warnings.warn(f"--synthetic-len {args.synthetic_len} is ignored with --data {args.data}: the folder's "
                          f"images make an epoch")
            args.synthetic_len = None
        args.synthetic_len = args.synthetic_len or SYNTHETIC_LEN  # recorded as before: a resume compares equal
    positive = ("epochs", "batch_size", "log_every", "save_every", "synthetic_len", *positive)
    non_negative = ("max_steps", "workers", *non_negative)
    for name in positive + non_negative:
        value = getattr(args, name, None)
        if value is not None and (value <= 0 if name in positive else value < 0):
            parser.error(f"--{name.replace('_', '-')} {value}: must be {'> 0' if name in positive else '>= 0'}")


def check_image_size(parser, args, dense):
    """ResNet inputs: at least 32 px (one C5 pixel). Dense losses on a 1 x 1 C5 map (below 64 px)
    compare one location per view: allowed for quick tests, with a warning."""
    if args.image_size < 32:
        parser.error(f"--image-size {args.image_size}: must be >= 32 (the ResNet's stride; 224 in the papers)")
    if dense and args.image_size < 64:
        warnings.warn(f"--image-size {args.image_size} gives a 1 x 1 C5 map: the dense loss sees one location "
                      f"per view (use >= 64 for a spatial map; 224 in the papers)")


# =================================================================================================
# 11. Logging, stop signals, divergence
# =================================================================================================
def progress(loader, epoch, epochs):
    """tqdm bar over one epoch, shown on rank 0 only."""
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not is_main(), dynamic_ncols=True,
                file=sys.stdout, mininterval=1.0)


def format_rate(images_per_s):
    """images/s for the progress bar: a decimal below 10, so that a slow run shows 0.4, not 0."""
    return f"{images_per_s:.1f}" if images_per_s < 10 else f"{images_per_s:.0f}"


def _finite_json(x):
    """JSON has no NaN/Infinity: non-finite floats are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


class JsonLog:
    """Append-only JSON-lines log (rank 0 writes, other ranks ignore); always valid JSON."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, **record):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **{k: _finite_json(v) for k, v in record.items()}}) + "\n")

    def truncate(self, step):
        """Drop the records of steps after `step` (logged after the checkpoint a run resumes from)."""
        if is_main() and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:  # a line a crash cut short
                    pass
            self.path.write_text("".join(l + "\n" for l in keep))


def mean_over_ranks(x):
    """All-reduce mean of a tensor (the logged losses of every rank, at log points only)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def catch_stop_signals():
    """On SIGINT (Ctrl-C) or SIGTERM (cluster preemption) finish the current step, save, and exit:
    the handler only records the signal; the loop asks stop_requested() after every step. A second
    Ctrl-C stops at once."""
    def handler(signum, frame):
        if os.getpid() != _RUN["pid"]:  # a loader worker (Ctrl-C reaches the whole process group): the run decides
            return
        if _RUN["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _RUN["stop"] = signum
        print0(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint",
               file=sys.stderr)
    _RUN["pid"] = os.getpid()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_requested():
    """The signal number every rank stops on after this step (0: go on). Under torchrun the ranks
    agree by an all-reduce (max) of a CPU scalar, so all of them save the same step."""
    flag = torch.tensor([_RUN["stop"]])
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_RUN["cpu_group"])
    return int(flag)


def exit_on_signal(signum, step, path):
    """After the checkpoint of `step` is saved: say how to resume, exit with 128 + signal number
    (non-zero, so that a scheduler requeues a preempted job)."""
    print0(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}. Rerun the same command "
           f"to resume from it.", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(128 + signum)


def check_finite(losses, modules, step, path, extra=()):
    """Stop the run on every rank if `losses` (the sums since the last check) or any weight, buffer or
    `extra` tensor is not finite: exit status 3 and a message naming the step and the last good
    checkpoint. One host sync, at log and save points only."""
    tensors = [t for m in modules.values() for t in m.state_dict().values() if t.is_floating_point()]
    extra = [t for e in extra for t in (e if isinstance(e, (list, tuple)) else [e])]
    tensors += [t for t in extra if torch.is_tensor(t) and t.is_floating_point()]
    norms = torch.stack(torch._foreach_norm([t.float() for t in tensors])) if tensors else torch.zeros(1)
    ok = (torch.isfinite(norms).all() & torch.isfinite(losses).all()).to(torch.int32).view(1)
    if world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        saved = _RUN["saved"].get(str(path))
        advice = (f"the last good checkpoint is {path} (step {saved}). Rerun with a lower --lr (or --amp fp32) and "
                  f"--allow-arg-changes to resume from it, or start afresh in a new --output-dir" if saved is not None
                  else "no checkpoint was written before it. Rerun with a lower --lr (or --amp fp32)")
        print0(f"\ndiverged: a non-finite loss or weight at step {step} (the check covers every step since the last "
               f"log or save point); nothing is saved from it: {advice}.", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(3)


# =================================================================================================
# 12. Output folder, checkpoints, resume, downstream weights
# =================================================================================================
def prepare_output(args, script):
    """The --output-dir path, and the script whose copy goes into it, once rank 0 has checked that
    the folder can be written (check_writable: before any data or model is built). Nothing is
    written yet: resume creates and locks the folder (lock_output) and write_run_record writes
    args.json and the copy once the run has started or resumed, so a refused or failed start
    leaves nothing behind and an existing run's records as they were."""
    _RUN["script"] = script
    if is_main():
        check_writable(args.output_dir)
    return Path(args.output_dir)


def check_writable(out):
    """Refuse, with one line, an output folder that cannot be written: an existing file, a path
    below a regular file, or a folder (or, if it does not exist yet, its nearest existing parent)
    where no file can be created. Creates nothing: the probe is an unnamed temporary file."""
    out = Path(out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        fail(f"--output-dir {out}: {'it is' if probe == out else f'{probe} is'} a file, not a folder. "
             f"Choose another --output-dir.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        fail(f"--output-dir {out}: cannot create files in {probe} ({e.strerror}). Choose a folder you can write, "
             f"or make it writable.")


# The lock is a file created with O_EXCL that holds pid@host, not an flock(): O_EXCL creation is atomic on
# NFS (v3 and later), Lustre and GPFS, where flock may be unsupported or local to one node, and the file
# names its holder. A holder killed with -9 leaves it behind: on the same host its pid is gone and the
# lock is taken over; from another host that cannot be checked, and the message says which file to remove.
LOCK_NAME = "run.lock"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def release_lock(out):
    """Remove the output folder's lock if this process holds it (at exit, or when a resume is refused)."""
    path = Path(out) / LOCK_NAME
    try:
        if path.read_text() == f"{os.getpid()}@{socket.gethostname()}":
            path.unlink()
    except OSError:
        pass


def lock_output(out):
    """Rank 0 creates the output folder and takes its lock (LOCK_NAME, released when the process
    exits): a second run into the same folder is refused with one line naming the holder, so two
    runs never write the same checkpoint. A lock left by a dead process on this host is taken over."""
    out, host = Path(out), socket.gethostname()
    me, path = f"{os.getpid()}@{host}", Path(out) / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--output-dir {out}: cannot create it ({e.strerror}). Choose a folder you can write.")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = path.read_text().strip()
            except FileNotFoundError:  # released meanwhile
                continue
            if holder == me:  # this process already holds it (main() called twice, as in the tests)
                return
            pid, _, holder_host = holder.partition("@")
            if holder_host == host and pid.isdigit() and not _process_alive(int(pid)):
                print0(f"{path}: process {pid} that held it is gone (killed?): taking the lock over")
                path.unlink(missing_ok=True)
                continue
            gone = f"if it is gone (its host {holder_host} is not this one, {host}, so this cannot be checked), " \
                if holder_host != host else "if it is gone, "
            fail(f"--output-dir {out} is in use by another run (process {holder}, {path}): wait for it to finish, "
                 f"choose another --output-dir, or, {gone}remove {path}.")
        except OSError as e:
            fail(f"--output-dir {out}: cannot create files in it ({e.strerror}). Choose a folder you can write.")
        else:
            os.write(fd, me.encode())
            os.close(fd)
            atexit.register(release_lock, out)
            return
    fail(f"--output-dir {out}: could not take its lock {path} (other runs are starting there at the same time)")


def write_run_record(out, args):
    """Create the output folder and write args.json and a copy of the script (rank 0)."""
    if is_main():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
        if _RUN.get("script"):
            shutil.copy(_RUN["script"], out / Path(_RUN["script"]).name)


class _ByteCounter:
    """A file that only counts what is written to it: the size a checkpoint needs on disk."""
    size = 0

    def write(self, b):
        self.size += memoryview(b).nbytes
        return memoryview(b).nbytes

    def flush(self):
        pass


def save_atomic(obj, path, prev=None):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file, and
    `path` stays as it was until the new file is complete (then it becomes `prev`, if given). A full
    disk or quota stops the run with one line saying where and how much the file needs; a failed
    write's partial file is removed (it would keep the disk full)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: a failed write's OSError, with its errno, is the context
            torch.save(obj, f)      # of torch's RuntimeError (given a path, torch says only "enforce fail ...")
    except BaseException as e:      # Ctrl-C included: no partial file stays behind
        tmp.unlink(missing_ok=True)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            counter = _ByteCounter()
            torch.save(obj, counter)
            kept = f" {path}, the last complete one, is kept." if path.exists() else ""
            fail(f"disk full: cannot write {path}: it needs {counter.size / 1e6:.1f} MB, "
                 f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB are free there ({cause.strerror}).{kept} "
                 f"Free some space (or choose an --output-dir on another disk) and rerun the same command to resume.")
        raise
    if prev is not None and path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run; the message says what to do,
    `why` what was wrong with the file (for callers whose advice differs, as eval_dense's --init)."""

    def __init__(self, message, why=None):
        super().__init__(message)
        self.why = why


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint (weights_only=True: tensors and plain containers only); an unreadable file
    raises CheckpointError naming it and saying what to do."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # torch's own text for a refused pickle suggests weights_only=False: not advice to pass on
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            why = "it holds objects other than tensors and plain containers"
        elif isinstance(e, pickle.UnpicklingError):
            why = "its bytes do not read as a PyTorch checkpoint"
        else:
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        prev = Path(path).with_name(Path(path).stem + ".prev.pth")
        keep = (f" The previous checkpoint {prev} is kept: `cp {prev} {path}` resumes from it."
                if prev.exists() and Path(path).name == "checkpoint.pth" else "")
        raise CheckpointError(f"cannot read {path} ({why}): it is damaged (a write cut short?) or not a file this "
                              f"project wrote. Move it aside (mv {path} {path}.bad) and rerun.{keep}", why) from None


def load_state(module, state, what, path):
    """module.load_state_dict(state) with an error that says which run and what to do on mismatch."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        fail(f"cannot resume {what} from {path}: the checkpoint was made with other settings "
             f"(arch, heads, queue size). Rerun with the arguments in {Path(path).parent}/args.json, "
             f"or choose a new --output-dir.\n{e}")


def rng_state():
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain containers."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                  *np_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, modules, optimizer, scaler, step, args, extra=None, losses=None):
    """Check that nothing is non-finite (every rank, see check_finite), then save atomically on rank
    0: named modules' state dicts, optimizer, GradScaler, step, args and every rank's RNG states.
    The checkpoint it replaces is kept as checkpoint.prev.pth once the new one is complete (a full
    disk leaves it as checkpoint.pth). A second save of the same step (the end of an epoch that also
    hit --save-every) is skipped, so that .prev stays one save back."""
    if _RUN["saved"].get(str(path)) == step:
        return
    check_finite(losses if losses is not None else torch.zeros(1), modules, step, path, (extra or {}).values())
    rngs = [rng_state()]
    if world_size() > 1:
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, rng_state())
    if is_main():
        path = Path(path)
        prev = path.with_name(path.stem + ".prev.pth")
        if path.exists():  # the disk holds two checkpoints at most: the last complete one and the new one
            prev.unlink(missing_ok=True)
        save_atomic({**{k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "args": vars(args), "rng": rngs, **(extra or {})},
                    path, prev)
    _RUN["saved"][str(path)] = step


# Arguments that cannot change what a run computes: a resume may differ in these.
NEUTRAL_ARGS = {"workers", "log_every", "save_every", "max_steps", "output_dir", "data_root", "compile",
                "allow_arg_changes", "pictures", "export"}


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def resume(path, modules, optimizer, scaler, device, args, log=None):
    """Restore what save_checkpoint wrote, if `path` (or, after a crash between the two renames of a
    save, its .prev.pth) exists; refuse a checkpoint of another script or of other arguments. Writes
    the run's records (write_run_record) once it has started or resumed. Returns (step, checkpoint
    or None)."""
    path = Path(path)
    if is_main():
        lock_output(path.parent)  # before anything in the folder is touched: another run may be writing it
        for stale in path.parent.glob("*.tmp"):  # left by a write that was killed
            stale.unlink()
    try:
        step, ckpt = _restore(path, modules, optimizer, scaler, device, args, log)
    except SystemExit:  # a refused resume: the folder is free again for the corrected command
        if is_main():
            release_lock(path.parent)
        raise
    write_run_record(path.parent, args)
    return step, ckpt


def _restore(path, modules, optimizer, scaler, device, args, log):
    """resume's reading of the checkpoint: (step, checkpoint), or (0, None) for a new run."""
    prev = path.with_name(path.stem + ".prev.pth")
    if not path.exists() and prev.exists():
        print0(f"{path} is missing but {prev} exists (a save was cut short): resuming from it")
        path = prev
    ckpt = None
    if path.exists():
        try:
            ckpt = load_checkpoint(path, device)
        except CheckpointError as e:
            fail(str(e))
        missing = [k for k in modules if k not in ckpt]
        if not isinstance(ckpt, dict) or missing or "step" not in ckpt:
            fail(f"{path} is not a checkpoint of this script: it has no {', '.join(missing) or 'step'} "
                 f"(it holds {', '.join(sorted(ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__}). "
                 f"It was probably written by another method: choose another --output-dir.")
        stored = ckpt.get("args", {})
        changed = {k: (stored[k], v) for k, v in vars(args).items()
                   if k in stored and k not in NEUTRAL_ARGS and _plain(stored[k]) != _plain(v)}
        if changed and not args.allow_arg_changes:
            diff = "; ".join(f"--{k.replace('_', '-')} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            fail(f"{path} was made with other arguments: {diff}. Rerun with the checkpoint's arguments "
                 f"({path.parent}/args.json), choose a new --output-dir, or pass --allow-arg-changes.")
        for key, module in modules.items():
            load_state(module, ckpt[key], f"the {key}", path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        if len(ckpt.get("rng", [])) == world_size():
            set_rng_state(ckpt["rng"][rank])
        else:
            warnings.warn(f"{path}: no RNG state for {world_size()} process(es); the resumed run is not bit-identical")
        _RUN["saved"][str(path)] = ckpt["step"]
        if log is not None:
            log.truncate(ckpt["step"])
        print0(f"resumed from {path} at step {ckpt['step']}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    return (ckpt["step"], ckpt) if ckpt is not None else (0, None)


def save_downstream(path, method, arch, backbone, decoder=None, decoder_cfg=None, extra=None):
    """Write the weights downstream uses (eval_dense.py): a torchvision-named backbone state dict,
    optionally a decoder and its configuration, the architecture and the method's name. Refuses
    non-finite weights (the run's last save_checkpoint has checked them on every rank)."""
    state = {"backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
             "decoder": None if decoder is None else {k: v.detach().cpu() for k, v in decoder.state_dict().items()}}
    if not all(torch.isfinite(v).all() for part in state.values() if part for v in part.values() if v.is_floating_point()):
        raise SystemExit(f"not writing {path}: the weights are not finite")
    save_atomic({"format": "dense-ssl-downstream-v1", "method": method, "arch": arch, **state,
                 "decoder_cfg": decoder_cfg, **(extra or {})}, path)


# =================================================================================================
# 13. The loop's plumbing
# =================================================================================================
class Loop:
    """Everything around a training loop that is not the method: resume, the epochs' samplers and
    progress bars, --max-steps, logging, divergence checks, checkpoints and stop signals. The loop
    itself stays in the method file, nanoGPT-style:

        loop = common.Loop(out, state, optimizer, scaler, args, log, steps_per_epoch, device)
        for epoch, batch in loop.batches(loader):   # from the resumed step to the last one
            lr = lr_schedule[loop.step]
            losses = train_step(batch, ...)         # the method
            loop.end_step(losses, lr)               # count; log, check, save, stop when due
        loop.save()

    `state`: the named modules a checkpoint holds; `extra`: tensors saved beside them, updated in
    place (centers); `loss_names`: the names logged for the first entries of the losses tensor,
    `rest_name` the name of a list holding the entries after them (loss_names ("loss",), rest_name
    "head_losses": a total and one loss per head). After construction `loop.step` is the resumed step and `loop.checkpoint` the
    checkpoint read (None on a fresh start)."""

    def __init__(self, out, state, optimizer, scaler, args, log, steps_per_epoch, device, extra=None,
                 loss_names=("loss",), rest_name=None):
        self.path, self.state, self.optimizer, self.scaler = Path(out) / "checkpoint.pth", state, optimizer, scaler
        self.args, self.log, self.steps_per_epoch, self.extra = args, log, steps_per_epoch, extra
        self.loss_names, self.rest_name = loss_names, rest_name
        self.step, self.checkpoint = resume(self.path, state, optimizer, scaler, device, args, log)
        total = args.epochs * steps_per_epoch
        self.last_step = min(total, args.max_steps) if getattr(args, "max_steps", None) is not None else total
        self.running, self.tick, self.tick_step, self.epoch, self.bar = None, time.time(), self.step, 0, None
        catch_stop_signals()  # SIGINT / SIGTERM: finish the step, save, exit

    def batches(self, loader):
        """(epoch, batch) from the resumed step to the last: each epoch's sampler reseeded
        (set_epoch), a resumed epoch skipping the batches it did, a progress bar per epoch, a
        checkpoint at the end of every epoch and at the last step."""
        for self.epoch in range(self.step // self.steps_per_epoch, self.args.epochs):
            if self.step >= self.last_step:
                break
            loader.sampler.set_epoch(self.epoch)
            loader.sampler.skip = (self.step - self.epoch * self.steps_per_epoch) * self.args.batch_per_rank
            self.bar = progress(loader, self.epoch, self.args.epochs)
            for batch in self.bar:
                if self.step >= self.last_step:
                    break
                yield self.epoch, batch
            loader.sampler.skip = 0
            self.save()

    def end_step(self, losses, lr, **logged):
        """After an optimizer step: count it, add its losses (a tensor: no host sync); at log points
        stop on a non-finite loss or weight and log the mean since the last one (with `logged`, the
        step's values of other quantities); save every --save-every steps; on SIGINT / SIGTERM save
        and exit."""
        losses = losses.detach().float().reshape(-1)
        self.running = losses.clone() if self.running is None else self.running + losses
        self.step += 1
        stop = stop_requested()  # the same on every rank
        if self.step % self.args.log_every == 0 or self.step == self.last_step or stop:
            check_finite(self.running, self.state, self.step, self.path, (self.extra or {}).values())
            means = (mean_over_ranks(self.running) / (self.step - self.tick_step)).tolist()
            named = dict(zip(self.loss_names, means))
            if self.rest_name is not None:
                named[self.rest_name] = means[len(self.loss_names):]
            speed = (self.step - self.tick_step) * self.args.batch_size / (time.time() - self.tick)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{means[0]:.3f}", lr=f"{lr:.4g}", img_s=format_rate(speed))
            self.log.write(step=self.step, epoch=self.epoch, **named, lr=lr, **logged, images_per_s=speed)
            self.running, self.tick, self.tick_step = None, time.time(), self.step
        if self.step % self.args.save_every == 0 or stop:
            self.save()
        if stop:
            exit_on_signal(stop, self.step, self.path)

    def save(self):
        """Save a checkpoint of the current step (after checking that nothing diverged)."""
        save_checkpoint(self.path, self.state, self.optimizer, self.scaler, self.step, self.args, self.extra,
                        losses=self.running)
