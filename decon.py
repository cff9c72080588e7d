r"""DeCon: joint encoder-decoder contrastive pre-training, over SlotCon (the paper's headline).

Paper: Quetin, Ghosh, Maleki, "Beyond the Encoder: Joint Encoder-Decoder Contrastive Pre-Training
Improves Dense Prediction", 2025, https://arxiv.org/abs/2503.17526. Official code:
https://github.com/sebquetin/DeCon (a fork of SlotCon: https://github.com/CVMI-Lab/SlotCon).

Method. A decoder (an FPN over C2-C5, or an FCN on C5) is attached to the encoder during
pre-training and gets its own contrastive loss, computed by heads that are fully separate from the
encoder's: the two objectives do not compete for the same heads, and both gradients reach the
shared encoder. DeCon-SL supervises the FPN's P2 only; DeCon-ML (--deep-supervision) supervises
P2-P5, each with its own heads. --decoder none is plain SlotCon, the paper's baseline; DeCon over
DenseCL, the paper's other framework, is decon_densecl.py.

SlotCon (Wen et al., NeurIPS 2022, https://arxiv.org/abs/2205.15288), the loss of every head:
per-pixel projections are softly assigned to K learnable prototypes; the student predicts the EMA
teacher's centered, sharpened assignment of the other view on the two crops' overlap (group loss);
the prototype-pooled "slots" of the two views are contrasted (slot InfoNCE). The whole loss, both
directions (A, B) = (1, 2) and (2, 1) summed:

    L = sum_h alpha_h · [ w_h · sum_(A,B) CE(student_A, teacher_B)     the group loss, per overlap pixel
                          + (1 - w_h) · sum_(A,B) 2·tau · InfoNCE_tau(predictor(student slots_A), teacher slots_B) ]

    heads h: the encoder's (on C5), then the decoder's (FPN P2, P2-P5 with --deep-supervision, or
    the FCN's output); alpha_h = alpha (--encoder-loss-weight) for the encoder head, (1 - alpha) /
    levels for each decoder head: DeCon-SL [0.5, 0.5], DeCon-ML [0.5, 0.125, 0.125, 0.125, 0.125],
    --decoder none [1]; w_h = 0.5 (--group-loss-weight; --decoder-group-loss-weight for the decoder
    heads, default the same); tau = 0.2 (--slot-temp), student / teacher temperatures 0.1 / 0.07.
    alpha_h and w_h are computed once in main() (head_weights, group_weights) and carried by the step's State.

The modules:
    student    encoder (+ decoder), and per head a projector and K prototypes   trained by the gradient
    teacher    EMA(student), momentum 0.99 -> 1 (cosine), updated before its forward   no gradient
    predictors one slot predictor MLP per head, student side only                      trained
    centers    one per head: EMA (0.9) of the teacher's mean assignment scores          buffers
There is no queue: a student slot's negatives are the valid teacher slots of the global batch.

Shapes per GPU at the paper's COCO run (8 GPUs x B = 64 images, 224 px, ResNet-50, K = 256
prototypes, D = 256 projection dimensions, DeCon-SL):
    views                         (B=64, 3, 224, 224) x 2
    encoder head    C5            (B, 2048, 7, 7)    -> z (B, D=256, 7, 7)   -> score (B, K=256, 7, 7)
    decoder head    P2            (B, 256, 56, 56)   -> z (B, D, 56, 56)     -> score (B, K, 56, 56)
    slots                         (B, K, D) per view and head

Launch:
    python decon.py                                              # DeCon-SL over SlotCon, COCO recipe, synthetic data
    python decon.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 --synthetic-len 2048 \
        --dim-hidden 1024 --lr 0.5                                # CPU demo, a few minutes
    python decon.py --data /path/to/images                       # your images
    torchrun --nproc_per_node=8 decon.py --data coco             # DeCon-SL (FPN, P2), 800 epochs
    torchrun --nproc_per_node=8 decon.py --data coco --deep-supervision --skip-channel-dropout 0.5   # DeCon-ML
    torchrun --nproc_per_node=8 decon.py --data coco --decoder fcn            # FCN decoder
    torchrun --nproc_per_node=8 decon.py --data coco --decoder none           # plain SlotCon (the baseline)

Reference results (abstract; ResNet-50 pre-trained on COCO, vs the framework without decoder; not
reproduced here): COCO det +0.37 AP, COCO inst seg +0.32 AP, VOC seg +1.42 mIoU, Cityscapes +0.50
mIoU. SlotCon's own COCO 800 ep baseline: Mask R-CNN 41.0 AP box / 37.0 AP mask. Measured here:
the miniature reproduction (docs/miniature.md, `python benchmarks/bench.py quality`).

Deviations from the official code:
- Two defects of the DeCon code are not reproduced: the teacher momentum advances once per
  iteration (that code advances its counter in both the encoder and the decoder EMA update, so the
  schedule ran twice as fast with a decoder), and the teacher decoder prototypes are EMA-updated
  like the encoder's (that code leaves them at their initial values).
- The second crop is re-drawn until it overlaps the first by at least 1% of its area; after 10
  tries it falls back to the first crop's box (SlotCon then falls back to an unconstrained crop,
  whose overlap box can be empty).
- Fewer than two valid slots in both views skip the slot loss for the step (SlotCon has no guard: it
  would compute a loss over an empty set): counted per rank without SyncBN; with SyncBN (CUDA, DDP)
  over all ranks, and every rank runs the predictor, so that every rank joins its collectives.
- The losses run in fp32 outside autocast (SlotCon computes them under fp16 autocast).
- --gpu-augment (off by default): the views on the device (OverlappingViews), the same
  distribution with bilinear instead of bicubic crops.

Checked against SlotCon's code (CVMI-Lab/SlotCon: models, utils/lars.py, the lr scheduler) and the
DeCon authors' code (their SlotCon fork with decoder_q / decoder_k, FPN and FCN decoders): the
teacher EMA before the teacher's forward, momentum cosine 0.99 -> 1 by iteration; SlotCon's LARS
(biases and norm parameters excluded); warm-up from lr/100; the ResNet's last BN gamma of every
residual block zeroed; SyncBN under DDP for every network; the decoder projector as wide as the
encoder's; the decoder levels' losses averaged.
"""
import argparse
import copy
import random
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import common


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="DeCon pre-training", formatter_class=common.HelpFormatter)
    p.add_argument("--decoder", default="fpn", choices=["fpn", "fcn", "none"], help="none = the plain framework (baseline)")
    p.add_argument("--deep-supervision", action="store_true", help="DeCon-ML: heads on P2-P5 (default DeCon-SL: P2 only)")
    p.add_argument("--skip-channel-dropout", type=float, default=0.0, help="Dropout2d on FPN skip connections (ML runs: 0.5)")
    p.add_argument("--skip-dropout", type=float, default=0.0, help="drop whole FPN skip maps (exclusive with the above)")
    p.add_argument("--fcn-channels", type=int, default=256, help="FCN decoder width (ADE20K setting: 512)")
    p.add_argument("--fcn-dilation", type=int, default=6, help="dilation of the FCN decoder's 3x3 convs (VOC/Cityscapes: 6, ADE20K: 1)")
    p.add_argument("--encoder-loss-weight", type=float, default=None,
                   help="alpha in alpha·L_enc + (1-alpha)·L_dec; 0 = no encoder head (DeCon: 0.5; with a decoder only)")
    p.add_argument("--arch", default="resnet50", choices=common.RESNET_ARCHS, help="backbone (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop side (paper: 224)")
    p.add_argument("--num-prototypes", type=int, default=None, help="K (SlotCon: 256 on COCO, 2048 on ImageNet)")
    p.add_argument("--decoder-num-prototypes", type=int, default=None, help="K of the decoder heads (default: --num-prototypes)")
    p.add_argument("--dim-hidden", type=int, default=4096, help="projector/predictor hidden width (SlotCon: 4096)")
    p.add_argument("--dim-out", type=int, default=256, help="projection dimension (SlotCon: 256)")
    p.add_argument("--teacher-momentum", type=float, default=0.99, help="EMA momentum, cosine to 1 over all steps (SlotCon: 0.99)")
    p.add_argument("--student-temp", type=float, default=0.1, help="student's softmax temperature (SlotCon: 0.1)")
    p.add_argument("--teacher-temp", type=float, default=0.07, help="teacher's softmax temperature (SlotCon: 0.07)")
    p.add_argument("--center-momentum", type=float, default=0.9,
                   help="EMA momentum of the centers subtracted from the teacher's scores (SlotCon: 0.9)")
    p.add_argument("--group-loss-weight", type=float, default=0.5, help="w in w·L_group + (1-w)·L_slot (SlotCon: 0.5)")
    p.add_argument("--decoder-group-loss-weight", type=float, default=None, help="w of the decoder heads (default: --group-loss-weight)")
    p.add_argument("--slot-temp", type=float, default=0.2, help="slot InfoNCE temperature (SlotCon: 0.2)")
    p.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop lower scale (SlotCon: 0.08)")
    p.add_argument("--lr", type=float, default=1.0, help="LARS lr per 256 images (SlotCon: 1.0)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="(SlotCon: 1e-5)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up from lr/100 (SlotCon: 5)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/decon on the synthetic scenes, "
                        "runs/decon-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=800, batch_size=512)
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("decon", args.data)
    common.check_args(p, args, positive=("lr", "dim_hidden", "dim_out", "num_prototypes", "decoder_num_prototypes",
                                         "student_temp", "teacher_temp", "slot_temp", "fcn_channels"),
                      non_negative=("weight_decay", "warmup_epochs", "skip_dropout", "skip_channel_dropout",
                                    "encoder_loss_weight", "group_loss_weight", "decoder_group_loss_weight"))
    common.check_image_size(p, args, dense=True)
    if args.skip_channel_dropout > 0 and args.skip_dropout > 0:
        p.error("--skip-channel-dropout and --skip-dropout are mutually exclusive")
    if (args.skip_channel_dropout or args.skip_dropout) and args.decoder != "fpn":
        p.error("skip-connection dropout needs --decoder fpn")
    if args.deep_supervision and args.decoder != "fpn":
        p.error("--deep-supervision needs --decoder fpn")
    if args.decoder != "none" and args.encoder_loss_weight is not None and args.encoder_loss_weight >= 1:
        p.error("--encoder-loss-weight 1 leaves the decoder without a loss; use --decoder none for the plain framework")
    if args.decoder == "none" and args.encoder_loss_weight is not None:
        p.error("--encoder-loss-weight only applies with a decoder")
    # Derived values, computed once.
    args.alpha = 1.0 if args.decoder == "none" else 0.5 if args.encoder_loss_weight is None else args.encoder_loss_weight
    common.split_batch(p, args)
    args.num_prototypes = args.num_prototypes or (2048 if args.data == "imagenet" else 256)
    args.decoder_num_prototypes = args.decoder_num_prototypes or args.num_prototypes
    if args.decoder_group_loss_weight is None:
        args.decoder_group_loss_weight = args.group_loss_weight
    args.scaled_lr = args.lr * args.batch_size / 256  # linear scaling rule
    return args


# =================================================================================================
# Data
# =================================================================================================
def crop_with_box(img, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                  interpolation=v2.InterpolationMode.BICUBIC):
    """RandomResizedCrop that also returns its box (x0, y0, x1, y1) in [0, 1] image units and flip."""
    top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(img, scale, ratio)
    crop = v2.functional.resized_crop(img, top, left, h, w, [size, size], interpolation, antialias=True)
    flip = random.random() < flip_p
    if flip:
        crop = v2.functional.horizontal_flip(crop)
    width, height = img.size
    box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
    return crop, box, flip


def overlap_boxes(b1, f1, b2, f2):
    """The overlap of crop boxes b1, b2 ((..., 4) in image [0, 1] units) in each view's own [0, 1]
    frame, mirrored where a view is flipped (f1, f2: bools of shape (...)): (..., 2, 4), the boxes
    align_to_overlap expects. Per image here; batched for --gpu-augment."""
    lo, hi = torch.maximum(b1[..., :2], b2[..., :2]), torch.minimum(b1[..., 2:], b2[..., 2:])  # overlap, image coords
    boxes = []
    for b, flip in ((b1, f1), (b2, f2)):
        wh = b[..., 2:] - b[..., :2]
        box = torch.cat([(lo - b[..., :2]) / wh, (hi - b[..., :2]) / wh], -1)  # (x0, y0, x1, y1) in the view
        mirrored = torch.stack([1 - box[..., 2], box[..., 1], 1 - box[..., 0], box[..., 3]], -1)
        boxes.append(torch.where(torch.as_tensor(flip, device=box.device)[..., None], mirrored, box))
    return torch.stack(boxes, -2)


class TwoCropsWithOverlap:
    """SlotCon's views: two crops that overlap, their overlap boxes, flip flags, and the BYOL
    asymmetric colour pipelines (blur 1.0 / 0.1, solarize 0 / 0.2)."""

    def __init__(self, size, min_scale):
        self.size, self.scale = size, (min_scale, 1.0)
        self.colour1, self.colour2 = common.byol_augmentations(size, crop=False)

    def __call__(self, img):
        view1, b1, f1 = crop_with_box(img, self.size, self.scale)
        for _ in range(10):  # the second crop must cover at least 1% of its area with the first
            view2, b2, f2 = crop_with_box(img, self.size, self.scale)
            inter = (torch.minimum(b1[2:], b2[2:]) - torch.maximum(b1[:2], b2[:2])).clamp(min=0).prod()
            if inter >= 0.01 * (b2[2:] - b2[:2]).prod():
                break
        else:  # no overlapping crop in 10 tries: use the first crop twice
            view2, b2, f2 = view1, b1, f1
        return [self.colour1(view1), self.colour2(view2)], overlap_boxes(b1, f1, b2, f2), torch.tensor([f1, f2])


class OverlappingViews:
    """TwoCropsWithOverlap on the device: two crops whose overlap covers at least 1% of the
    second (the first of 10 candidates; else the first crop twice), BYOL's asymmetric colour
    (blur 1.0 / 0.1, solarize 0 / 0.2). Returns ([view1, view2], overlap boxes (B, 2, 4), flips (B, 2))
    as the CPU pipeline."""

    def __init__(self, size, min_scale):
        self.size, self.scale, self.kernel = size, (min_scale, 1.0), common.blur_kernel(size)

    @torch.no_grad()
    def __call__(self, batch, device):
        images, sizes = common.device_images(batch, device)
        B = len(images)
        b1 = common.crop_params(sizes.float(), self.scale) / sizes.float().flip(1).repeat(1, 2)  # (B, 4) in [0, 1]
        cand = (common.crop_params(sizes.float().repeat(10, 1), self.scale) / sizes.float().flip(1).repeat(10, 2)).view(10, B, 4)
        inter = (torch.minimum(b1[..., 2:], cand[..., 2:]) - torch.maximum(b1[..., :2], cand[..., :2])).clamp(min=0).prod(-1)
        ok = inter >= 0.01 * (cand[..., 2:] - cand[..., :2]).prod(-1)  # (10, B)
        first = ok.int().argmax(0)  # the first overlapping candidate (0 if none)
        b2 = torch.where(ok.any(0)[:, None], cand[first, torch.arange(B, device=device)], b1)  # (B, 4)
        f1 = torch.rand(B, device=device) < 0.5
        f2 = torch.where(ok.any(0), torch.rand(B, device=device) < 0.5, f1)
        wh = sizes.float().flip(1).repeat(1, 2)
        x = common.resized_crops(images, torch.cat([b1, b2]) * torch.cat([wh, wh]), self.size)  # (2B, 3, S, S)
        flips = torch.cat([f1, f2])
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        view1 = common.device_colour(x[:B], **common.BYOL_COLOUR, p_blur=1.0, p_solarize=0.0, kernel=self.kernel)
        view2 = common.device_colour(x[B:], **common.BYOL_COLOUR, p_blur=0.1, p_solarize=0.2, kernel=self.kernel)
        return [view1, view2], overlap_boxes(b1, f1, b2, f2), torch.stack([f1, f2], 1)


def build_data(args, device):
    """SlotCon's views: overlapping crops with their overlap boxes and flips. Returns the loader and, with --gpu-augment, the device-side
    augmentation (common.py, section 7) its decoded batches go through."""
    if args.gpu_augment:
        dataset = common.build_pretrain_dataset(args, common.DecodeOnly(args.max_side))
        return (common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device, common.pad_collate),
                OverlappingViews(args.image_size, args.min_scale))
    dataset = common.build_pretrain_dataset(args, TwoCropsWithOverlap(args.image_size, args.min_scale))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device), None


# =================================================================================================
# Model
# =================================================================================================
def fcn_decoder(cin, channels=256, dilation=6):
    """FCN decoder on C5: two 3x3 conv-BN-ReLU (dilated), as the FCN-D6 segmentation head. Dilation 6
    on a 7 x 7 C5 at 224 px (most taps fall in the zero padding) is the DeCon authors' choice: their
    MMSeg_FCN_Decoder with the Cityscapes setting (256 channels, padding 6, dilation 6), the width and
    dilation of the FCN-D6 head it initialises downstream (ADE20K's: 512, dilation 1)."""
    conv = lambda i: nn.Conv2d(i, channels, 3, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(conv(cin), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         conv(channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def mlp(cin, hidden, out, conv):
    """SlotCon's 3-layer projector (1x1 convs) or predictor (linear): BN + GELU between, trunc-normal init."""
    lin = (lambda a, b: nn.Conv2d(a, b, 1)) if conv else nn.Linear
    bn = nn.BatchNorm2d if conv else nn.BatchNorm1d
    net = nn.Sequential(lin(cin, hidden), bn(hidden), nn.GELU(), lin(hidden, hidden), bn(hidden), nn.GELU(), lin(hidden, out))
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


class HeadOutput(NamedTuple):
    """One head's output on one view."""
    z: torch.Tensor  # (B, D, h, w) the projection of every pixel
    score: torch.Tensor  # (B, K, h, w) its cosine with every prototype


class SlotHead(nn.Module):
    """SlotCon head on one feature map: projector and K prototypes. Returns a HeadOutput."""

    def __init__(self, cin, hidden, dim, num_prototypes):
        super().__init__()
        self.projector = mlp(cin, hidden, dim, conv=True)
        self.prototypes = nn.Embedding(num_prototypes, dim)

    def forward(self, x):
        z = self.projector(x)
        score = torch.einsum("kd,bdhw->bkhw", F.normalize(self.prototypes.weight, dim=1), F.normalize(z, dim=1))
        return HeadOutput(z, score)


class Network(nn.Module):
    """Encoder, optional decoder, and one head per supervised output. Student and teacher alike.

    Head order, relied on everywhere a per-head list appears (losses, centers, predictors, weights):
    heads[0] is the encoder head (on C5) when alpha > 0; the decoder heads follow, FPN P2 first
    (P2-P5 with deep supervision), or the FCN output. With alpha = 0 there is no encoder head.
    """

    def __init__(self, args):
        super().__init__()
        self.encoder = common.ResNetTrunk(args.arch, pyramid=args.decoder == "fpn", zero_init_residual=True)  # SlotCon's
        c5 = self.encoder.out_channels
        self.decoder, dec_channels = None, []
        if args.decoder == "fpn":
            levels = ["p2", "p3", "p4", "p5"] if args.deep_supervision else ["p2"]  # DeCon-ML or DeCon-SL
            p = args.skip_channel_dropout or args.skip_dropout
            self.decoder = common.FPN(self.encoder.channels, 256, levels, p, "channel" if args.skip_channel_dropout else "map")
            for m in self.decoder.modules():  # detectron2's c2_xavier_fill, as DeCon's detectron2-style FPN
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=1)
            dec_channels = [256] * len(levels)
        elif args.decoder == "fcn":
            self.decoder = fcn_decoder(c5, args.fcn_channels, args.fcn_dilation)
            dec_channels = [args.fcn_channels]
        self.with_encoder_head = args.alpha > 0
        cins = ([c5] if self.with_encoder_head else []) + dec_channels
        ks = ([args.num_prototypes] if self.with_encoder_head else []) + [args.decoder_num_prototypes] * len(dec_channels)
        self.heads = nn.ModuleList(SlotHead(c, args.dim_hidden, args.dim_out, k) for c, k in zip(cins, ks))

    def decoder_config(self, args):
        if args.decoder == "fpn":
            return self.decoder.config
        return {"type": args.decoder, "in_channels": self.encoder.out_channels, "out_channels": args.fcn_channels,
                "dilation": args.fcn_dilation} if args.decoder == "fcn" else None

    def forward_one(self, x):
        feats = self.encoder(x)
        c5 = feats[-1] if isinstance(feats, list) else feats
        outputs = [c5] if self.with_encoder_head else []
        if isinstance(self.decoder, common.FPN):
            outputs += self.decoder(feats)
        elif self.decoder is not None:
            outputs.append(self.decoder(c5))
        return [head(o) for head, o in zip(self.heads, outputs)]

    def forward(self, *views):
        """Each view separately (BN statistics per view, as the official code), in one call so that
        DDP sees a single forward per backward. Returns, per view, a list of per-head outputs."""
        return [self.forward_one(x) for x in views]


# =================================================================================================
# Loss
# =================================================================================================
def align_to_overlap(x, boxes, flips):
    """Resample maps (B, C, h, w) to the overlap of the two crops and undo the flip.

    boxes: (B, 4) overlap box (x0, y0, x1, y1) in this view's [0, 1] coordinates (as the view was
    fed, i.e. after its flip; made by overlap_boxes in the Data section); flips: (B,) bool. After
    alignment, pixel (i, j) of both views shows the same image point.
    """
    B, _, h, w = x.shape
    rois = torch.cat([torch.arange(B, device=x.device, dtype=x.dtype)[:, None],
                      boxes.to(x.dtype) * torch.tensor([w, h, w, h], device=x.device, dtype=x.dtype)], 1)  # (B, 5)
    aligned = torchvision.ops.roi_align(x, rois, (h, w), aligned=True)  # (B, C, h, w)
    return torch.where(flips[:, None, None, None], aligned.flip(-1), aligned)


@common.fp32
def group_loss(score_s, score_t, center, student_temp, teacher_temp):
    """Cross-entropy of the student's per-pixel prototype assignment against the teacher's
    centered, sharpened one (SlotCon Eq. 2). score_s, score_t: (B, K, h, w) aligned; center: (K,)."""
    s = score_s.permute(0, 2, 3, 1).flatten(0, 2)  # (B·h·w, K)
    t = score_t.permute(0, 2, 3, 1).flatten(0, 2)
    target = F.softmax((t - center) / teacher_temp, dim=1)
    return -(target * F.log_softmax(s / student_temp, dim=1)).sum(1).mean()


@common.fp32
def slots(z, score, temp):
    """Slot k of each image: the average of z weighted by the softmax (over prototypes) of the
    assignment, slot_k = sum_p A_kp z_p / sum_p A_kp (SlotCon Eq. 3). z (B, D, h, w) -> (B, K, D)."""
    attn = F.softmax(score / temp, dim=1) + 1e-6  # (B, K, h, w)
    return torch.einsum("bdhw,bkhw->bkd", z, attn / attn.sum((2, 3), keepdim=True))


def present_prototypes(score):
    """(B, K, h, w) -> (B, K) bool: prototype k wins (is the argmax of) at least one pixel of image b.
    The winners scattered into (B, K): the same mask as SlotCon's scatter into a (B, K, h, w) float
    copy of the scores, without that copy (P2 scores of the paper's per-GPU batch, (64, 256, 56, 56):
    peak 1.6 MB, against 413 MB for a one-hot of the argmax; benchmarks/memory.py step_peak, CPU)."""
    winners = score.argmax(1).flatten(1)  # (B, h·w)
    return torch.zeros(score.shape[:2], dtype=torch.bool, device=score.device).scatter_(1, winners, True)


@common.fp32
def slot_loss(q_slots, k_slots, score_q, score_k, predictor, tau):
    """Slot InfoNCE (SlotCon Eq. 4), scaled by 2·tau.

    q_slots: (B, K, D) student slots of view A;  k_slots: (B, K, D) teacher slots of view B.
    score_q, score_k: (B, K, h, w) their (unaligned) assignment scores. A slot is valid where its
    prototype is the argmax of at least one pixel. Each student slot valid in both views must pick
    the teacher slot of the same image and prototype among all valid teacher slots of all ranks.
    """
    B, K, D = q_slots.shape
    valid_q, valid_k = present_prototypes(score_q), present_prototypes(score_k)  # (B, K)
    rows = (valid_q & valid_k).flatten().nonzero().squeeze(1)  # (M,) positions in B·K
    valid_k_all = common.concat_all_gather(valid_k.flatten())  # (W·B·K,)
    k_all = common.concat_all_gather(F.normalize(k_slots, dim=2).flatten(0, 1))  # (W·B·K, D)
    cols = valid_k_all.nonzero().squeeze(1)  # (Nk,) one host sync: the number of valid slots varies
    # The predictor's BatchNorm needs two rows. Under DDP on CUDA it is a SyncBatchNorm, whose
    # forward and backward are collectives: every rank must call it, so decide on the global count.
    synced = dist.is_initialized() and any(isinstance(m, nn.SyncBatchNorm) for m in predictor.modules())
    count = torch.tensor([rows.numel()], device=q_slots.device)
    if synced:
        dist.all_reduce(count)
    if count.item() < 2:
        return q_slots.sum() * 0
    q = F.normalize(predictor(q_slots.flatten(0, 1)[rows]), dim=1)  # (M, D)
    if rows.numel() == 0:  # only with SyncBN: stay in the graph so that the backward collective runs too
        return q.sum() * 0
    logits = q @ k_all[cols].T / tau  # (M, Nk)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # The columns are the valid teacher slots in (rank, image, prototype) order, so the target of
    # row (b, k) is the number of valid teacher slots before it: a cumulative count over validity.
    labels = valid_k_all.long().cumsum(0)[rows + rank * B * K] - 1  # (M,)
    return F.cross_entropy(logits, labels) * 2 * tau


def head_weights(args, num_heads):
    """alpha_h, the weight of each head's loss: alpha for the encoder head, (1 - alpha) / levels for
    each decoder head."""
    n_dec = num_heads - (1 if args.alpha > 0 else 0)
    return ([args.alpha] if args.alpha > 0 else []) + [(1 - args.alpha) / max(n_dec, 1)] * n_dec


def group_weights(args, num_heads):
    """w_h, each head's share of the group loss against the slot loss: --group-loss-weight for the
    encoder head, --decoder-group-loss-weight for the decoder heads."""
    n_enc = 1 if args.alpha > 0 else 0
    return [args.group_loss_weight] * n_enc + [args.decoder_group_loss_weight] * (num_heads - n_enc)


@common.fp32
def slotcon_losses(out_s, out_t, boxes, flips, predictors, centers, alpha_h, w_h, args):
    """The SlotCon losses of every head, in fp32; updates the centers. Returns (total, per head (H,)).

    out_s, out_t: student and teacher outputs, per view (2), per head: a HeadOutput (z (B, D, h, w),
    score (B, K_h, h, w)). boxes (B, 2, 4), flips (B, 2): per view, for align_to_overlap. alpha_h,
    w_h: the docstring's weights, one per head. The rule: student view A against teacher view B,
    both directions (A, B) = (1, 2) and (2, 1).
    """
    total, per_head = 0.0, []
    for h, (predictor, center, w) in enumerate(zip(predictors, centers, w_h)):
        l_group, l_slot = 0.0, 0.0
        for a, b in ((0, 1), (1, 0)):
            z_s, score_s = out_s[a][h].z.float(), out_s[a][h].score.float()  # student, view A
            z_t, score_t = out_t[b][h].z.float(), out_t[b][h].score.float()  # teacher, view B
            l_group = l_group + group_loss(align_to_overlap(score_s, boxes[:, a], flips[:, a]),
                                           align_to_overlap(score_t, boxes[:, b], flips[:, b]),
                                           center, args.student_temp, args.teacher_temp)
            temp = args.teacher_temp  # SlotCon pools student and teacher slots at the teacher temperature
            l_slot = l_slot + slot_loss(slots(z_s, score_s, temp), slots(z_t, score_t, temp), score_s, score_t,
                                        predictor, args.slot_temp)
        update_center(center, torch.cat([out_t[0][h].score, out_t[1][h].score]).float(), args.center_momentum)
        loss = w * l_group + (1 - w) * l_slot
        total = total + alpha_h[h] * loss
        per_head.append(loss.detach())
    return total, torch.stack(per_head)


# =================================================================================================
# Train step
# =================================================================================================
def schedules(args, steps_per_epoch):
    """The lr and the teacher momentum of every step, as SlotCon: a linear warm-up from lr/100
    (lr/100·(1 + 99·t/W) at step t of W), then a per-step cosine to 1e-6; the momentum a cosine from
    --teacher-momentum to 1 over all steps."""
    lr = common.cosine_schedule(args.scaled_lr, 1e-6, args.epochs, steps_per_epoch, args.warmup_epochs,
                                warmup_start=args.scaled_lr / 100)
    return lr, common.momentum_schedule(args.teacher_momentum, args.epochs, steps_per_epoch)


@torch.no_grad()
def ema_update(teacher_params, student_params, m):
    """teacher <- m·teacher + (1 - m)·student over encoder, decoder, projectors and prototypes."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)


@torch.no_grad()
def update_center(center, teacher_scores, momentum):
    """center <- momentum·center + (1 - momentum)·mean teacher score over every pixel of every
    rank. teacher_scores: (B', K, h, w); center: (K,)."""
    batch_center = teacher_scores.mean((0, 2, 3))  # (K,)
    if common.world_size() > 1:
        dist.all_reduce(batch_center)
        batch_center /= common.world_size()
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


class State(NamedTuple):
    """What a DeCon step reads and updates, besides its batch."""
    student: nn.Module  # encoder (+ decoder) and the heads, as trained (DDP / torch.compile wrap it)
    teacher: nn.Module  # an EMA of the student, never trained by gradients
    predictors: nn.ModuleList  # one per head, student only (outside DDP: their gradients are averaged by hand)
    centers: list  # one (K,) tensor per head: EMA of the teacher's assignment scores
    alpha_h: list  # each head's loss weight (head_weights)
    w_h: list  # each head's group-loss share (group_weights)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(batch, s, momentum, args):
    """One DeCon iteration at teacher EMA `momentum`: the EMA update, student and teacher on both
    views (autocast), the fp32 head losses (which update the centers), the optimizer step. Returns
    the total loss and one per head, (1 + H,). Host syncs: slot_loss's valid-slot counts only."""
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    ema_update(list(s.teacher.parameters()), list(s.student.parameters()), momentum)  # before the teacher's forward (SlotCon)
    views, boxes, flips = batch  # the overlap boxes and flips come from TwoCropsWithOverlap (Data)
    x1, x2 = (v.to(s.device, non_blocking=True, memory_format=memory_format) for v in views)  # (B, 3, H, W)
    with common.autocast(s.device, s.dtype):
        out_s = s.student(x1, x2)  # per view, per head: HeadOutput(z, score)
        with torch.no_grad():
            out_t = s.teacher(x1, x2)
    loss, per_head = slotcon_losses(out_s, out_t, boxes.to(s.device), flips.to(s.device), s.predictors, s.centers,
                                    s.alpha_h, s.w_h, args)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if common.world_size() > 1:
        # The predictors see a data-dependent subset of slots, outside the DDP-wrapped forward:
        # average their gradients by hand (a rank without valid slots contributes zeros).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in s.predictors.parameters()]
        for p, g in zip(s.predictors.parameters(), grads):
            p.grad = g
            dist.all_reduce(g)
        torch._foreach_div_(grads, common.world_size())
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return torch.cat([loss.detach().view(1), per_head])


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
    lr_schedule, m_schedule = schedules(args, steps_per_epoch)

    student = common.sync_batchnorm(Network(args), True).to(device)  # SyncBN for every network, as SlotCon
    teacher = copy.deepcopy(student).requires_grad_(False)
    n_heads = len(student.heads)
    alpha_h, w_h = head_weights(args, n_heads), group_weights(args, n_heads)  # the docstring's weights
    predictors = common.sync_batchnorm(nn.ModuleList(mlp(args.dim_out, args.dim_hidden, args.dim_out, conv=False)
                                                     for _ in range(n_heads)), True).to(device)  # one per head
    centers = [torch.zeros(h.prototypes.num_embeddings, device=device) for h in student.heads]  # one per head
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    # Every rank starts from the same weights (seeded above); from here on each rank draws its own
    # random numbers (crops, skip dropout), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    common.print0(f"DeCon | SlotCon + decoder {args.decoder}{' (ML)' if args.deep_supervision else ''} | "
                  f"{n_heads} heads, weights {[round(a, 3) for a in alpha_h]} | {args.arch} {args.image_size}px | "
                  f"{world} x {args.batch_per_rank} images | lr {args.scaled_lr:g} | {args.epochs} epochs x {steps_per_epoch} "
                  f"steps | {common.precision_name(dtype)} | device {device} | output {out}")
    optimizer = common.LARS(common.lars_param_groups(nn.ModuleList([student, predictors])), lr=args.scaled_lr,
                            weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"student": student, "teacher": teacher, "predictors": predictors}, optimizer, scaler,
                       args, log, steps_per_epoch, device, extra={"centers": centers}, rest_name="head_losses")
    if loop.checkpoint is not None:  # resumed: the centers too
        for c, saved in zip(centers, loop.checkpoint["centers"]):
            c.copy_(saved)
    model_s = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    s = State(torch.compile(model_s) if args.compile else model_s, teacher, predictors, centers, alpha_h, w_h,
              optimizer, scaler, dtype, device)

    for epoch, batch in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> the method's views, on the device
            batch = device_views(batch, device)
        lr, momentum = lr_schedule[loop.step], m_schedule[loop.step]
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = train_step(batch, s, momentum, args)  # (1 + H,): the total, then one per head
        loop.end_step(losses, lr, teacher_momentum=momentum)
    loop.save()
    # Downstream uses the teacher encoder and decoder, as SlotCon/DeCon's conversion scripts.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "decon" if args.decoder != "none" else "slotcon", args.arch,
                               teacher.encoder, teacher.decoder, teacher.decoder_config(args),
                               extra={"framework": "slotcon"})
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return student, teacher, predictors


if __name__ == "__main__":
    main()
