r"""ADCLR: patch-level contrasting without patch correspondence, on a DINO ViT.

Paper: Zhang, Zhu, Zhao, Yan, "Patch-level Contrasting without Patch Correspondence for Accurate and
Dense Contrastive Representation Learning", ICLR 2023, https://arxiv.org/abs/2306.13337.

The token layout of one global view (ViT-S/16, 224 px, Q = 10 queries of one token each, t = 1):

    tokens:  [ CLS | 196 patches (14 x 14, with position) | 10 queries (no position) ]  = 207
    mask (True = may attend), rows attend to columns:
                   CLS + patches    queries
    CLS + patches  yes              no          the image rows are blind to the queries:
    queries        yes              own only    the DINO path is exactly DINO's

Method. DINO (Caron et al. 2021): a student ViT and an EMA teacher ViT, each with a DINO head, see
multi-crop views; the student's output distribution on every view must match the teacher's
(centered, sharpened) distribution on the other global views. ADCLR adds Q *query patches*: random
crops of the original image, each resized to one patch and embedded by the ViT's own patch
embedding *without* positional embedding, appended to both global views (student and teacher),
with the mask above. Because a query carries no position, its output can only be matched across
views by its index: the student's i-th query output in view A must match the teacher's i-th query
output in view B (a DINO loss through the same head, with its own center). Total loss = L_DINO +
lambda·L_query, lambda = 1. No parameters beyond DINO's. With --query-size above the patch size a
query crop is t = (size / patch)² tokens, so the query outputs are (2, B, Q·t, K).

Launch:
    python adclr.py                                                 # ViT-S/16 recipe, synthetic data
    python adclr.py --arch vit_micro --global-size 64 --local-size 32 --local-crops 2 --batch-size 32 \
        --epochs 5 --synthetic-len 2048 --out-dim 4096 --lr 0.001  # CPU demo, a few minutes
    python adclr.py --data /path/to/images                          # your images
    torchrun --nproc_per_node=8 adclr.py --data imagenet                            # ViT-S/16, 100 epochs
    torchrun --nproc_per_node=8 adclr.py --data imagenet --query-weight 0           # plain DINO
    python adclr.py ... --query-size 96 --query-augment local --query-target alone --queries-see-each-other
                                                                    # queries as in the authors' PQCL code

Reference results (abstract; not reproduced here): ViT-S/16 linear 77.5 (+0.5 over DINO); ViT-B/16
linear 79.8, fine-tune 84.0; COCO Mask R-CNN 44.3 AP box / 39.7 AP mask; ADE20K +1.0 mIoU over
SelfPatch. Measured here: the miniature reproduction (docs/miniature.md,
`python benchmarks/bench.py quality`).

Recipe (the defaults; every flag's help names its source). The paper's training details could not
be read here (only its abstract), so the defaults are one stated recipe: the authors' own 100-epoch
ViT-S/16 launch of their code (Sherrylone/PQCL's README: 100 epochs, 64 images x 8 GPUs, global
crops 0.25-1, local and query crops 0.05-0.25, teacher temperature 0.04 -> 0.07 over 30 epochs,
norm_last_layer false, lambda 1) for every value it sets, and DINO's main_dino.py defaults for the
rest (AdamW, lr 5e-4 x N/256, 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, EMA
0.996 -> 1, clip 3.0, drop path 0.1, 8 local crops of 96 px, out dim 65536). The query settings
are the paper's reading (one token per query, cross-view targets), the launch's where it gives one.
`--query-weight 0` is then DINO at that recipe, not DINO's 100-epoch README run (which has 0.4-1 /
0.05-0.4 crops, teacher 0.04 flat and norm_last_layer true).

Deviations from DINO's code: the losses and centers are computed in fp32 outside autocast (DINO
computes them under fp16 autocast); bf16 autocast by default on CUDA; --gpu-augment (off by
default) makes the views on the device (MultiCropViews), bilinear instead of bicubic.

Open choices. The paper is the authority; where it leaves a choice open, the default is the paper's
reading and the alternative is what the authors' code does (below), as a flag:
- --num-queries 10 (paper); --query-scale 0.05 0.25 (area fraction of the image; the launch's).
- --query-size: default the patch size, one token per query (paper); authors' code: 96-px crops, 36
  tokens each. Without --queries-see-each-other a query token attends to the image tokens and to
  the tokens of its own crop.
- --query-augment none (only resizing, bicubic); authors' code: "local", DINO's local colour
  pipeline (jitter 0.8, grayscale 0.2, blur 0.5).
- --query-target cross-view (paper): the teacher's i-th query appended to the other global view;
  authors' code: "alone", the teacher encodes each query crop on its own as an image and its patch
  tokens are the targets of both views.
- --queries-see-each-other off (paper: a query sees the image and itself); authors' code: on.
- --query-weight (lambda) 1.0; the query loss uses the same DINO head as the CLS token, its own
  center (momentum 0.9) and the same temperatures; queries are appended to the global views only.

Checked against: DINO's code (facebookresearch/dino, main_dino.py, utils.py, vision_transformer.py)
for AdamW with lr warm-up and cosine, the weight-decay and teacher-temperature schedules, the EMA
after the optimizer step; per-parameter gradient clipping (0 = none); last layer frozen in epoch 1;
stochastic depth in the student only; a weight-normalised last layer (--norm-last-layer false
learns its norm); bicubic crops; DINO's positional-embedding interpolation (checks/official.py adclr
runs it beside DINO's code). ADCLR's own code
was not released: the paper links github.com/Sherrylone/Query_Contrastive, continued as
Sherrylone/PQCL, which implements the follow-up PQCL (ICML 2023) with ADCLR's path commented out;
its query choices are the alternatives above.
"""
import argparse
import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common

BICUBIC = v2.InterpolationMode.BICUBIC


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="ADCLR pre-training", formatter_class=common.HelpFormatter)
    # One recipe: the authors' 100-epoch ViT-S/16 launch of their code (Sherrylone/PQCL, README: "launch"
    # below) for every value it sets, DINO's main_dino.py defaults ("DINO") for the rest.
    p.add_argument("--arch", default="vit_small", choices=list(common.VIT_ARCHS), help="(paper and launch: ViT-S)")
    p.add_argument("--patch-size", type=int, default=16, help="(launch and DINO: 16)")
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension (DINO: 65536)")
    p.add_argument("--norm-last-layer", default="false", choices=["true", "false"],
                   help="fix the norm of the head's last layer to 1 (launch: false; DINO's default: true)")
    p.add_argument("--drop-path", type=float, default=0.1, help="student stochastic depth rate (launch and DINO: 0.1)")
    p.add_argument("--global-size", type=int, default=224, help="global crop side (DINO: 224)")
    p.add_argument("--local-size", type=int, default=96, help="local crop side (launch and DINO: 96)")
    p.add_argument("--local-crops", type=int, default=8,
                   help="DINO's local crops per image (DINO: 8; the launch's only local crop is its query crop)")
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.25, 1.0), help="global crop area range (launch)")
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.25), help="local crop area range (launch)")
    p.add_argument("--num-queries", type=int, default=10, help="query crops per image, Q (paper: 10)")
    p.add_argument("--query-scale", type=float, nargs=2, default=(0.05, 0.25),
                   help="area range of query crops (launch: its query crops' 0.05 0.25)")
    p.add_argument("--query-size", type=int, default=None,
                   help="query crop side in px (default: the patch size, 1 token, the paper's; launch: 96, 36 tokens)")
    p.add_argument("--query-augment", default="none", choices=["none", "local"],
                   help="colour augmentation of query crops (paper: none; the PQCL code: local)")
    p.add_argument("--query-target", default="cross-view", choices=["cross-view", "alone"],
                   help="teacher target of a query: the same query in the other view (paper), or the crop encoded "
                        "alone (the PQCL code)")
    p.add_argument("--queries-see-each-other", action="store_true",
                   help="let query tokens attend to every query token (the PQCL code; paper: off)")
    p.add_argument("--query-weight", type=float, default=1.0, help="lambda of the query loss; 0 = plain DINO (launch: 1)")
    p.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA, cosine to 1 (DINO: 0.996)")
    p.add_argument("--teacher-temp", type=float, default=0.07, help="teacher temperature after its warm-up (launch: 0.07)")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at the start (DINO: 0.04)")
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=30,
                   help="epochs of the linear teacher-temperature warm-up (launch: 30)")
    p.add_argument("--student-temp", type=float, default=0.1, help="student's softmax temperature (DINO: 0.1)")
    p.add_argument("--center-momentum", type=float, default=0.9,
                   help="EMA momentum of the centers subtracted from the teacher's outputs (DINO: 0.9)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW lr per 256 images, scaled by batch / 256 (DINO: 5e-4)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the cosine's final lr (DINO: 1e-6)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear lr warm-up from 0 (DINO: 10)")
    p.add_argument("--weight-decay", type=float, default=0.04, help="weight decay at the start, cosine (DINO: 0.04)")
    p.add_argument("--weight-decay-end", type=float, default=0.4, help="weight decay at the end (DINO: 0.4)")
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm clip, 0 = none (DINO: 3.0)")
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen (DINO: 1)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/adclr on the synthetic scenes, "
                        "runs/adclr-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=100, batch_size=512,
                        epochs_help="training epochs (launch and DINO's 100-epoch ViT-S/16 run: 100; batch: 64 x 8 GPUs)")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("adclr", args.data)
    common.check_args(p, args, positive=("lr", "out_dim", "patch_size", "global_size", "local_size", "student_temp",
                                         "teacher_temp"),
                      non_negative=("weight_decay", "weight_decay_end", "min_lr", "warmup_epochs", "num_queries",
                                    "local_crops", "clip_grad", "drop_path", "query_weight"))
    args.query_size = args.query_size or args.patch_size
    common.split_batch(p, args)
    for name, size in (("--global-size", args.global_size), ("--local-size", args.local_size), ("--query-size", args.query_size)):
        if size % args.patch_size:
            p.error(f"{name} {size} is not a multiple of --patch-size {args.patch_size}")
    args.query_tokens = (args.query_size // args.patch_size) ** 2  # tokens per query crop
    args.scaled_lr = args.lr * args.batch_size / 256  # linear scaling rule
    return args


# =================================================================================================
# Data
# =================================================================================================
class MultiCropWithQueries:
    """DINO multi-crop (2 global + n local views, bicubic) plus Q query crops of the original image."""

    def __init__(self, args):
        self.global1, self.global2 = common.byol_augmentations(args.global_size, scale=tuple(args.global_scale),
                                                               interpolation=BICUBIC)
        colour = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
        self.local = v2.Compose([
            v2.RandomResizedCrop(args.local_size, scale=tuple(args.local_scale), interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(), *colour,
            v2.RandomApply([v2.GaussianBlur(common.blur_kernel(args.local_size), sigma=(0.1, 2.0))], p=0.5),
            *to_tensor,
        ])
        query_colour = [*colour, v2.RandomApply([v2.GaussianBlur(common.blur_kernel(args.query_size), sigma=(0.1, 2.0))],
                                                p=0.5)] if args.query_augment == "local" else []
        self.query = v2.Compose([
            v2.RandomResizedCrop(args.query_size, scale=tuple(args.query_scale), interpolation=BICUBIC, antialias=True),
            *query_colour, *to_tensor,
        ])
        self.n_local, self.n_queries = args.local_crops, args.num_queries

    def __call__(self, img):
        queries = torch.stack([self.query(img) for _ in range(self.n_queries)]) if self.n_queries else torch.zeros(0)
        return [self.global1(img), self.global2(img)], [self.local(img) for _ in range(self.n_local)], queries


class MultiCropViews:
    """MultiCropWithQueries on the device: 2 global views (BYOL's asymmetric colour), n local
    views (jitter, grayscale, blur 0.5) and Q query crops (colour as the local views with
    --query-augment local). Returns ([g1, g2], [locals], queries (B, Q, 3, q, q))."""

    def __init__(self, args):
        self.args = args

    @torch.no_grad()
    def __call__(self, batch, device):
        a = self.args
        images, sizes = common.device_images(batch, device)
        B = len(images)
        g, _, _ = common.device_crops(images, sizes, 2, a.global_size, tuple(a.global_scale))
        k = common.blur_kernel(a.global_size)
        globals_ = [common.device_colour(g[:B], **common.BYOL_COLOUR, p_blur=1.0, p_solarize=0.0, kernel=k),
                    common.device_colour(g[B:], **common.BYOL_COLOUR, p_blur=0.1, p_solarize=0.2, kernel=k)]
        local = []
        if a.local_crops:
            x, _, _ = common.device_crops(images, sizes, a.local_crops, a.local_size, tuple(a.local_scale))
            local = list(common.device_colour(x, **common.BYOL_COLOUR, p_blur=0.5, p_solarize=0.0, kernel=common.blur_kernel(a.local_size)).split(B))
        queries = torch.zeros(0, device=device)
        if a.num_queries:
            q, _, _ = common.device_crops(images, sizes, a.num_queries, a.query_size, tuple(a.query_scale), flip_p=0.0)
            if a.query_augment == "local":
                q = common.device_colour(q, **common.BYOL_COLOUR, p_blur=0.5, p_solarize=0.0, kernel=common.blur_kernel(a.query_size))
            else:
                q = common.normalise(q)
            queries = q.view(a.num_queries, B, *q.shape[1:]).transpose(0, 1)  # (B, Q, 3, q, q)
        return globals_, local, queries


def build_data(args, device):
    """Multi-crop views and query crops of every image. Returns the loader and, with --gpu-augment, the device-side
    augmentation (common.py, section 7) its decoded batches go through."""
    if args.gpu_augment:
        dataset = common.build_pretrain_dataset(args, common.DecodeOnly(args.max_side), crop=args.global_size)
        return (common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device, common.pad_collate),
                MultiCropViews(args))
    dataset = common.build_pretrain_dataset(args, MultiCropWithQueries(args), crop=args.global_size)
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device), None


# =================================================================================================
# Model
# =================================================================================================
class DINOHead(nn.Module):
    """3-layer MLP (GELU) to a 256-d bottleneck, L2-normalised, then a weight-normalised linear
    layer W = g · v / |v| per output row, named as DINO's (last_layer.weight_g, last_layer.weight_v).
    norm_last_layer fixes g = 1 (no gradient), as DINO's default."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach())  # (K, 256)
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)  # (K, 1)
        self.out_dim = out_dim

    def forward(self, x):  # (..., in_dim) -> (..., out_dim)
        w = self.last_layer.weight_g * F.normalize(self.last_layer.weight_v, dim=1)  # (K, 256)
        return F.linear(F.normalize(self.mlp(x), dim=-1), w)


def query_mask(num_image_tokens, num_queries, t, see_each_other, device):
    """(L, L) bool attention mask, mask[i, j] True = token i may attend to token j, tokens ordered
    [CLS, patches, queries of t tokens each]: image tokens see image tokens only (the DINO path is
    unchanged); a query token sees the image tokens and the tokens of its own query crop (every query
    token with see_each_other)."""
    n_q = num_queries * t
    mask = torch.zeros(num_image_tokens + n_q, num_image_tokens + n_q, dtype=torch.bool, device=device)
    mask[:, :num_image_tokens] = True
    own = torch.block_diag(*[torch.ones(t, t, dtype=torch.bool, device=device)] * num_queries)
    mask[num_image_tokens:, num_image_tokens:] = True if see_each_other else own
    return mask


def with_queries(vit, images, q_tokens, mask):
    """The ViT on images (B, 3, H, W) with query tokens (B, Q·t, D) appended: [CLS | patches | queries]
    (common.ViT.forward's steps, with the append and the mask: keep the two in step).
    The positional embedding is added to the image tokens before the queries are appended, so a query
    has none; `mask` (L, L) keeps the image tokens blind to the queries. Returns (B, 1 + N + Q·t, D)."""
    h, w = images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size
    tokens = torch.cat([vit.cls_token.expand(images.shape[0], -1, -1), vit.embed(images)], 1) + vit.pos_for(h, w)
    tokens = torch.cat([tokens, q_tokens], 1)  # (B, 1 + N + Q·t, D): the queries after, without position
    for blk in vit.blocks:
        tokens = blk(tokens, mask)
    return vit.norm(tokens)


class DINONet(nn.Module):
    """ViT + DINO head. forward(globals, locals, queries) runs every view in one call (one DDP
    forward per backward) and returns CLS outputs (V, B, K) and query outputs (2, B, Q·t, K)."""

    def __init__(self, args, drop_path=0.0):
        super().__init__()
        self.vit = common.ViT(args.arch, args.patch_size, args.global_size, drop_path_rate=drop_path)
        self.head = DINOHead(self.vit.embed_dim, args.out_dim, norm_last_layer=args.norm_last_layer == "true")
        self.see_each_other, self.t = args.queries_see_each_other, args.query_tokens  # t tokens per query crop

    def forward(self, globals_, locals_=(), queries=None):
        B = globals_[0].shape[0]
        if queries is None:
            tokens = self.vit(torch.cat(list(globals_)))  # (2B, 1 + N, D)
        else:  # (B, Q, 3, s, s): each crop embedded as t tokens by the ViT's own patch embedding
            Q = queries.shape[1]
            q_tokens = self.vit.embed(queries.flatten(0, 1)).reshape(B, -1, self.vit.embed_dim)  # (B, Q·t, D)
            q_tokens = q_tokens.repeat(len(globals_), 1, 1)  # (2B, Q·t, D): the same queries in both global views
            n_img = 1 + (globals_[0].shape[-1] // self.vit.patch_size) ** 2
            mask = query_mask(n_img, Q, self.t, self.see_each_other, queries.device)  # (L, L)
            tokens = with_queries(self.vit, torch.cat(list(globals_)), q_tokens, mask)  # (2B, 1 + N + Q·t, D)
        cls = [tokens[:, 0]]
        if len(locals_):
            cls.append(self.vit(torch.cat(list(locals_)))[:, 0])  # (nL·B, D), one size for all locals
        cls_out = self.head(torch.cat(cls)).view(-1, B, self.head.out_dim)  # (V, B, K)
        if queries is None:
            return cls_out, None
        q_out = self.head(tokens[:, -q_tokens.shape[1]:]).view(len(globals_), B, q_tokens.shape[1], -1)  # (2, B, Q·t, K)
        return cls_out, q_out

    def encode_queries_alone(self, queries):
        """--query-target alone: each query crop as an image of its own (CLS, patches, position), its
        patch tokens through the head. queries (B, Q, 3, s, s) -> (B, Q·t, K)."""
        B = queries.shape[0]
        tokens = self.vit(queries.flatten(0, 1))[:, 1:]  # (B·Q, t, D)
        return self.head(tokens).reshape(B, -1, self.head.out_dim)


# =================================================================================================
# Loss
# =================================================================================================
@common.fp32
def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO's cross-entropy over all (teacher view, other student view) pairs, batched.

    student_out: (V, B, K) logits of every view (the first 2 are the global views).
    teacher_out: (2, B, K) teacher logits of the global views;  center: (K,).
    """
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1)  # (2, B, K)
    s = F.log_softmax(student_out / student_temp, dim=-1)  # (V, B, K)
    ce = -torch.einsum("tbk,vbk->tv", t, s) / s.shape[1]  # (2, V): mean over images of every pair
    same_view = torch.eye(t.shape[0], s.shape[0], dtype=torch.bool, device=ce.device)
    return ce[~same_view].mean()


@common.fp32
def query_loss(student_q, teacher_q, center, student_temp, teacher_temp):
    """ADCLR's query loss, token by token (Q·t tokens: t per query crop, 1 by default).
    student_q: (2, B, Q·t, K), the student's query outputs in each global view. teacher_q: (2, B,
    Q·t, K) cross-view: the student's i-th query token in view A against the teacher's i-th in view
    B (A != B); or (B, Q·t, K) with --query-target alone: one target per token for both views.
    center: (K,)."""
    s = F.log_softmax(student_q / student_temp, dim=-1)  # (2, B, Q·t, K)
    t = F.softmax((teacher_q - center) / teacher_temp, dim=-1)
    if t.ndim == 3:
        return -torch.einsum("bqk,vbqk->", t, s) / s[..., 0].numel()
    ce = -torch.einsum("tbqk,vbqk->tv", t, s) / (s.shape[1] * s.shape[2])  # (2, 2)
    return (ce[0, 1] + ce[1, 0]) / 2


# =================================================================================================
# Train step
# =================================================================================================
def schedules(args, steps_per_epoch):
    """DINO's schedules (utils.cosine_scheduler): per step the lr (a linear warm-up from 0 that ends on
    the base lr, then a cosine to --min-lr), the weight decay (a cosine, no warm-up) and the teacher
    momentum (a cosine to 1); per epoch the teacher temperature (linear, then constant)."""
    lr = common.cosine_schedule(args.scaled_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                warmup_endpoint=True)
    wd = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum = common.momentum_schedule(args.momentum_teacher, args.epochs, steps_per_epoch)
    warm = min(args.warmup_teacher_temp_epochs, args.epochs)
    temp = np.concatenate([np.linspace(args.warmup_teacher_temp, args.teacher_temp, warm),
                           np.full(args.epochs - warm, args.teacher_temp)])
    return lr, wd, momentum, temp


@torch.no_grad()
def ema_update(teacher_params, student_params, m):
    """teacher <- m·teacher + (1 - m)·student, one fused foreach kernel."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)

@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """center <- momentum·center + (1 - momentum)·mean of teacher outputs over all ranks. teacher_out (..., K)."""
    batch_center = teacher_out.flatten(0, -2).mean(0)  # (K,)
    if common.world_size() > 1:
        dist.all_reduce(batch_center)
        batch_center /= common.world_size()
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)

@torch.no_grad()
def clip_per_parameter(grads, clip):
    """DINO's clip_gradients: scale each parameter's gradient to norm <= clip (on its own)."""
    scale = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, clip)
    torch._foreach_clamp_max_(scale, 1.0)  # min(1, clip / |g|), one kernel per op for all parameters
    torch._foreach_mul_(grads, scale)


class State(NamedTuple):
    """What an ADCLR step reads and updates, besides its crops."""
    student: nn.Module  # the student as trained (DDP / torch.compile wrap it; the parameters are its)
    teacher: nn.Module  # an EMA of the student, never trained by gradients
    center_cls: torch.Tensor  # (K,) EMA of the teacher's [CLS] outputs (DINO's center)
    center_query: torch.Tensor  # (K,) EMA of the teacher's query outputs (ADCLR's second center)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(batch, s, epoch, momentum, teacher_temp, args):
    """One ADCLR iteration at teacher EMA `momentum` and `teacher_temp`: both networks on the crops
    (the queries too), the DINO and query losses, clipping, the optimizer step, then the teacher's EMA
    and both centers. Returns (total, DINO, query) loss tensors (no host sync)."""
    globals_, locals_, queries = batch
    globals_ = [g.to(s.device, non_blocking=True) for g in globals_]
    locals_ = [l.to(s.device, non_blocking=True) for l in locals_]
    use_q = args.num_queries > 0 and args.query_weight > 0
    queries = queries.to(s.device, non_blocking=True) if use_q else None
    cross_view = args.query_target == "cross-view"
    with common.autocast(s.device, s.dtype):
        with torch.no_grad():
            t_cls, t_q = s.teacher(globals_, (), queries if use_q and cross_view else None)
            if use_q and not cross_view:
                t_q = s.teacher.encode_queries_alone(queries)  # (B, Q·t, K)
        s_cls, s_q = s.student(globals_, locals_, queries)
    t_cls = t_cls.float()  # the losses in fp32: bf16 logits over 65536 prototypes move the loss by 1e-2
    l_dino = dino_loss(s_cls.float(), t_cls, s.center_cls, args.student_temp, teacher_temp)
    l_query = (query_loss(s_q.float(), t_q.float(), s.center_query, args.student_temp, teacher_temp) if use_q
               else torch.zeros((), device=s.device))
    loss = l_dino + args.query_weight * l_query
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.optimizer)
    if args.clip_grad > 0:  # DINO: 0 means no clipping
        clip_per_parameter([p.grad for p in s.student.parameters() if p.grad is not None], args.clip_grad)
    if epoch < args.freeze_last_layer:  # DINO: the last layer stays fixed in the first epoch
        for name, p in s.student.named_parameters():
            if ".last_layer." in name:
                p.grad = None
    s.scaler.step(s.optimizer)
    s.scaler.update()
    ema_update(list(s.teacher.parameters()), list(s.student.parameters()), momentum)  # after the step, as DINO
    update_center(s.center_cls, t_cls, args.center_momentum)
    if use_q:
        update_center(s.center_query, t_q.float(), args.center_momentum)
    return torch.stack([loss.detach(), l_dino.detach(), l_query.detach()])


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
    steps_per_epoch = len(loader)
    lr_schedule, wd_schedule, m_schedule, temp_per_epoch = schedules(args, steps_per_epoch)
    common.print0(f"ADCLR | {args.arch}/{args.patch_size} | Q = {args.num_queries} x {args.query_tokens} token(s), "
                  f"lambda {args.query_weight}, target {args.query_target} | {world} x {args.batch_per_rank} images | "
                  f"lr {args.scaled_lr:g} | {args.epochs} epochs x {steps_per_epoch} steps | "
                  f"{common.precision_name(dtype)} | device {device} | output {out}")

    student = DINONet(args, drop_path=args.drop_path).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)  # DINO's teacher: the same weights, no stochastic depth
    for block in teacher.vit.blocks:
        block.drop_path = 0.0
    centers = torch.zeros(2, args.out_dim, device=device)  # the [CLS] and query centers, saved as one (2, K) tensor
    # Every rank starts from the same weights (seeded above); from here on each rank draws its own
    # random numbers (crops, stochastic depth), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    trained = [p for p in student.parameters() if p.requires_grad]  # the EMA covers all, g too, as DINO
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]  # biases and norms: no weight decay (DINO)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.scaled_lr,
                                  foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"student": student, "teacher": teacher}, optimizer, scaler, args, log, steps_per_epoch,
                       device, extra={"centers": centers}, loss_names=("loss", "loss_dino", "loss_query"))
    if loop.checkpoint is not None:  # resumed: the centers too
        centers.copy_(loop.checkpoint["centers"])
    model_s = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    # centers[0] and centers[1] are views of `centers`: update_center writes them in place, so the
    # checkpoint's (2, K) tensor always holds both.
    s = State(torch.compile(model_s) if args.compile else model_s, teacher, centers[0], centers[1], optimizer, scaler,
              dtype, device)

    for epoch, batch in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> the method's views, on the device
            batch = device_views(batch, device)
        lr = lr_schedule[loop.step]
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = wd_schedule[loop.step]
        teacher_temp = float(temp_per_epoch[epoch])
        losses = train_step(batch, s, epoch, m_schedule[loop.step], teacher_temp, args)
        loop.end_step(losses, lr, teacher_temp=teacher_temp)
    loop.save()
    # Downstream uses the teacher ViT, as DINO's evaluation scripts.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "adclr" if args.query_weight > 0 else "dino", args.arch,
                               teacher.vit, extra={"patch_size": args.patch_size, "img_size": args.global_size})
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return student, teacher


if __name__ == "__main__":
    main()
