"""Backbones for the method files: the ResNet trunk (C2-C5), the FPN neck, and the ViT.

A method file copied into another project needs this file, imagedata.py and common.py next to it.
"""
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torchvision


# =================================================================================================
# Backbones
# =================================================================================================
class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc, keeping torchvision's parameter names.

    forward returns C5 (B, C, H/32, W/32), or with pyramid=True the list [C2, C3, C4, C5] of
    strides 4, 8, 16, 32.
    """

    def __init__(self, arch="resnet50", pyramid=False, conv_init="fan_out", zero_init_residual=False):
        super().__init__()
        if arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"--arch {arch}: expected resnet18, resnet34, resnet50 or resnet101")
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
        (DeCon's whole-map mode)."""
        if not self.training or self.skip_dropout == 0:
            return x
        if self.skip_drop_mode == "channel":
            return nn.functional.dropout2d(x, self.skip_dropout, training=True)
        return torch.zeros_like(x) if random.random() < self.skip_dropout else x

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
    timm ViT state dicts load with strict=True. forward(x, extra, mask): `extra` (B, Q, D) tokens are
    appended after the patches *without* positional embedding; `mask` (L, L) bool restricts
    attention. Returns all normalised tokens (B, 1 + N + Q, D). Other image sizes interpolate the
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

    def forward(self, x, extra=None, mask=None):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos_for(h, w)
        if extra is not None:
            tokens = torch.cat([tokens, extra], 1)  # no positional embedding: position-free queries
        for blk in self.blocks:
            tokens = blk(tokens, mask)
        return self.norm(tokens)
