"""Downstream dense evaluation: linear probe and fine-tuning for semantic segmentation, and export.

What the papers measure is dense prediction after pre-training. This script measures it on your
data, from any method file's output, and hands the weights to detection toolkits.

    python eval_dense.py --init runs/moco --task probe             # frozen backbone, 1x1 linear head
    python eval_dense.py --init random --arch resnet18 --task probe # the floor: a random backbone
    python eval_dense.py --init runs/decon --task finetune --data voc        # SlotCon/DeCon's VOC protocol
    python eval_dense.py --init runs/decon --task finetune --head fpn --init-decoder
    python eval_dense.py --init runs/densecl --export detectron2 densecl_d2.pkl
    torchrun --nproc_per_node=8 eval_dense.py --init runs/densecl --task finetune --data cityscapes
    torchrun --nproc_per_node=8 eval_dense.py --init runs/moco --task linear --data imagenet   # MoCo's linear protocol

Tasks:
- probe: the backbone is frozen (eval-mode BN); a BatchNorm without affine parameters and a 1x1
  conv classify every feature of C5 (dilated to output stride --output-stride); logits are
  upsampled bilinearly to the label size. Only the classifier learns: a measure of the features.
- finetune: end to end. `--head fcn` (a ResNet's default): mmsegmentation's FCN head on a dilated
  ResNet, FCN-D6 (output stride 16, 256 channels at dilation 6) or FCN-d8 (output stride 8, concat
  with the input, dropout 0.1, an auxiliary FCN on C4 weighted 0.4), as --protocol says; `--head
  fpn` (a ViT's default): an FPN over C2-C5 with a 3x3 conv and classifier on P2, which
  `--init-decoder` initialises from a pre-trained DeCon or MCL decoder (a DeCon FCN decoder goes
  into --head fcn's convs).
- detect / instance: Faster / Mask R-CNN R50-FPN on COCO or the synthetic scenes; Faster R-CNN R50-C4
  on VOC07+12 (evaluation/detection.py, evaluation/voc.py).
- knn / linear: image classification on the frozen features, DINO's k-NN and MoCo's (ResNet) or
  DINO's (ViT) linear protocol, on an ImageNet-layout folder or the synthetic scenes
  (evaluation/classification.py).

Backbones: ResNets and the ViTs of adclr.py (the probe on the patch tokens at the patch stride,
fine-tuning on a simple feature pyramid, k-NN and linear on the [CLS] tokens).

Initialisation (--init): `random`; a run folder or its downstream.pth (method, arch and decoder are
read from the file); or the authors' released checkpoints of MoCo, DenseCL/OpenSelfSup, SlotCon,
DeCon, MCL and DINO/ADCLR, or a plain state dict (evaluation/weights.py lists the layouts). Every backbone tensor
must be found. Nothing is downloaded. --export writes detectron2, torchvision or timm files.

Data (--data): synthetic (default), voc, cityscapes, ade20k (segmentation), coco, voc (detection),
imagenet or any ImageFolder-layout folder (knn, linear); docs/downstream.md has the layouts.
Metrics in <output-dir>/metrics.json: segmentation mIoU, per-class IoU and pixel accuracy from a
confusion matrix summed over all ranks, every image tested at its own size, unpadded, as
mmsegmentation; COCO or VOC AP; top-1 and top-5. Precision: fp32 by default, as every official
protocol (--amp bf16 opts into autocast for the networks; losses, boxes and metrics stay fp32). Segmentation and detection
also draw <output-dir>/predictions.png for the first validation images.

Protocol (--protocol, seg_data.PROTOCOLS): for voc, cityscapes and ade20k every flag left unset takes
the configs of the papers: `slotcon` (default), the three SlotCon's README runs and the DeCon and
SlotCon tables use (FCN-D6 at output stride 16: VOC 513 crops 30k iterations, Cityscapes 769 crops
90k with sliding windows; FCN-d8 at output stride 8 on ADE20K, 80k); `densecl`, DenseCL's
mmsegmentation fork (FCN-d8: VOC 20k, Cityscapes 40k). docs/downstream.md has the table. Deviations:
the photometric distortion converts to HSV with PIL, not OpenCV (hue range scaled 180 -> 256); a
training image is scaled by its short side; ResNet dilation is applied in place (also to ResNet-18,
which torchvision refuses to dilate).
"""
import argparse
import hashlib
import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from evaluation import pictures, seg_data, weights
from evaluation.probe import cached_probe  # --probe-cache


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="dense downstream evaluation", formatter_class=common.HelpFormatter)
    p.add_argument("--init", default="random",
                   help="random | a run folder | a downstream.pth | an authors' checkpoint (MoCo, DenseCL, SlotCon, DeCon, "
                        "MCL, DINO/ADCLR) | a torchvision or timm state dict")
    p.add_argument("--arch", default=None, choices=[*common.RESNET_ARCHS, *common.VIT_ARCHS],
                   help="default: from --init's metadata, else resnet50")
    p.add_argument("--task", default="probe", choices=["probe", "finetune", "detect", "instance", "knn", "linear"],
                   help="probe / finetune: semantic segmentation; detect / instance: Faster / Mask R-CNN (needs "
                        "pycocotools); knn / linear: image classification on frozen features (evaluation/classification.py)")
    p.add_argument("--head", default=None, choices=["fcn", "fpn", "linear"],
                   help="finetune head (default: fcn for a ResNet, fpn for a ViT); linear: the probe's head trained "
                        "end to end (the miniature's supervised ceiling)")
    p.add_argument("--probe-layers", default="c5", choices=["c5", "c345"],
                   help="probe features: C5, or C3-C5 concatenated at C3's resolution (ResNets)")
    p.add_argument("--probe-cache", action="store_true",
                   help="probe: compute the frozen features of the training scenes once (no augmentation) and train "
                        "the linear head on them for --probe-epochs (synthetic data; memory: N x C x h x w floats)")
    p.add_argument("--probe-epochs", type=int, default=40, help="epochs over the cached features (--probe-cache)")
    p.add_argument("--init-decoder", action="store_true",
                   help="initialise the segmentation head from the pre-trained decoder: --head fpn from an FPN "
                        "(DeCon, MCL), --head fcn from an FCN of the same width and dilation (DeCon --decoder fcn)")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch (default: from --init's metadata, else 16)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic | voc | cityscapes | ade20k (segmentation) | coco | voc (detection) | imagenet or a "
                        "folder with train/<class>/* and val/<class>/* (knn, linear)")
    p.add_argument("--data-root", default=common.default_data_root())
    p.add_argument("--protocol", default="slotcon", choices=list(seg_data.PROTOCOLS),
                   help="segmentation on voc / cityscapes / ade20k: slotcon = the configs of SlotCon's README, which "
                        "the DeCon and SlotCon tables use (FCN-D6 at output stride 16 on VOC 30k and Cityscapes 90k, "
                        "FCN-d8 on ADE20K 80k); densecl = DenseCL's (FCN-d8, VOC 20k, Cityscapes 40k). Every flag "
                        "below left unset takes the protocol's value (docs/downstream.md lists them)")
    p.add_argument("--synthetic-train", type=int, default=2000, help="synthetic training scenes")
    p.add_argument("--synthetic-val", type=int, default=200, help="synthetic validation scenes")
    p.add_argument("--synthetic-size", type=int, default=224, help="side of a synthetic scene")
    p.add_argument("--synthetic-style", default="colour", choices=common.SCENE_STYLES,
                   help="synthetic scenes in colour, or mono: grey background, dark and light grey objects")
    # The protocol's training (segmentation: seg_data.PROTOCOLS; detection: the 1x schedule)
    p.add_argument("--iters", type=int, default=None,
                   help="training iterations (protocol; synthetic 2000; COCO detection 90k, VOC detection 24k)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (protocol; detection 16)")
    p.add_argument("--lr", type=float, default=None, help="SGD lr (protocol; the probe 0.01; detection 0.02 x batch / 16)")
    p.add_argument("--steps", type=float, nargs="+", default=None,
                   help="lr x0.1 at these iterations, or fractions of --iters if below 1 (segmentation: the protocol's, "
                        "else poly 0.9; detection: 2/3 and 8/9, 60k and 80k of 90k)")
    p.add_argument("--min-lr", type=float, default=None, help="the poly schedule's floor (protocol)")
    p.add_argument("--weight-decay", type=float, default=None, help="(protocol; the probe 0; detection 1e-4)")
    p.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32], help="dilated ResNet (protocol)")
    p.add_argument("--fcn-head", default=None, choices=["d6", "d8"],
                   help="--head fcn: d6 = 256 channels, 3x3 convs at dilation 6, no concat, no dropout (FCN-D6); "
                        "d8 = 512 channels (256 below ResNet-50), concat with the input, dropout 0.1 (FCN-d8)")
    p.add_argument("--aux-weight", type=float, default=None, help="auxiliary FCN head on C4, 0: none (protocol)")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (protocol; synthetic 224)")
    p.add_argument("--base-size", type=int, default=None,
                   help="short side a training image is scaled to before --scale-range (protocol: the crop; "
                        "Cityscapes 1024, i.e. native)")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0),
                   help="random rescaling of training images before the crop (protocol: 0.5 2.0)")
    p.add_argument("--cat-max", type=float, default=None,
                   help="re-draw a crop (up to 10 times) where one class covers more than this share (1: off)")
    p.add_argument("--photometric", default=None, choices=["on", "off"],
                   help="mmsegmentation's PhotoMetricDistortion on training crops")
    p.add_argument("--val-resize", type=int, nargs=2, metavar=("SHORT", "LONG"), default=None,
                   help="test-time resize to fit SHORT x LONG, ratio kept; 0 0: native")
    p.add_argument("--slide", type=int, nargs=2, metavar=("CROP", "STRIDE"), default=None,
                   help="sliding-window testing; 0 0: whole image")
    p.add_argument("--align-corners", default=None, choices=["on", "off"], help="logits resized with align_corners")
    p.add_argument("--input-norm", default=None, choices=["imagenet", "moco-configs"],
                   help="imagenet: mean/std on [0, 1] pixels; moco-configs: the same constants on [0, 255] pixels, as "
                        "SlotCon's *_moco configs (seg_data.normalise)")
    # Classification only (knn, linear)
    p.add_argument("--k", type=int, default=20, help="knn: neighbours that vote (DINO: 20)")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="knn: votes weighted exp(cosine / T) (DINO: 0.07)")
    p.add_argument("--epochs", type=int, default=None, help="linear: epochs (MoCo and DINO: 100)")
    p.add_argument("--n-last-blocks", type=int, default=None,
                   help="linear on a ViT: the [CLS] of the last n blocks (DINO: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool-patchtokens", default=None, choices=["on", "off"],
                   help="linear on a ViT: also the mean patch token (DINO: off for ViT-S, on for ViT-B)")
    # Detection only
    p.add_argument("--detector", default=None, choices=["fpn", "c4"],
                   help="detect: R50-FPN (COCO's protocol; the default but on VOC) or R50-C4 (MoCo's and DenseCL's "
                        "VOC07+12 protocol; the default with --data voc)")
    p.add_argument("--warmup", type=int, default=None,
                   help="detection: linear warm-up iterations (coco 1000, voc 100; at most iters/10)")
    p.add_argument("--train-sizes", type=int, nargs="+", default=None,
                   help="detection: short sides drawn per image (coco: 640-800 by 32; voc: 480-800 by 32; synthetic: "
                        "--synthetic-size)")
    p.add_argument("--test-size", type=int, default=None, help="detection: short side at test (coco and voc: 800)")
    p.add_argument("--max-size", type=int, default=1333, help="detection: long side cap")
    p.add_argument("--proposals", type=int, default=None,
                   help="detection: RPN proposals kept per image in training (FPN: 1000; C4: 2000, 1000 in testing)")
    p.add_argument("--rois-per-image", type=int, default=512, help="detection: sampled RoIs per training image (512)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="(protocol: SGD, momentum 0.9)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32: every official protocol's precision (mmsegmentation, detectron2, MoCo's and DINO's "
                        "evaluations), on every device; bf16 / fp16: autocast for the networks, faster on a GPU, the "
                        "losses, box coordinates, NMS and metrics kept in fp32 (docs/downstream.md: its effect)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--pictures", type=int, default=4, help="validation images drawn in predictions.png")
    p.add_argument("--output-dir", default=None,
                   help="default: runs/eval/<init>-<task>[-<head>]-<data>-<hash of every result-changing argument, "
                        "the --init weights' content among them>")
    p.add_argument("--allow-arg-changes", action="store_true", help="resume although result-changing arguments differ")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "PATH"),
                   help="detectron2 OUT.pkl | torchvision OUT.pth | timm OUT.pth (vit_tiny, vit_small, vit_base; patch "
                        "16, or 8 for small and base), then exit")
    args = p.parse_args(argv)
    detection, classification = args.task in ("detect", "instance"), args.task in ("knn", "linear")
    if classification:
        if args.data not in ("synthetic", "imagenet") and not Path(args.data).is_dir():
            p.error(f"--data {args.data}: --task {args.task} takes synthetic, imagenet (below --data-root) or a folder "
                    f"with train/<class>/* and val/<class>/*")
    elif detection and args.data not in ("synthetic", "coco", "voc"):
        p.error(f"--data {args.data}: --task {args.task} takes coco, voc (VOC07+12 with --detector c4) or synthetic")
    elif not detection and args.data not in ("synthetic", "voc", "cityscapes", "ade20k"):
        p.error(f"--data {args.data}: segmentation takes synthetic, voc, cityscapes or ade20k (coco: --task detect / "
                f"instance; imagenet or a folder: --task knn / linear)")
    coco, voc = detection and args.data == "coco", detection and args.data == "voc"
    if detection:
        args.detector = args.detector or ("c4" if voc else "fpn")
        if args.detector == "c4" and args.task == "instance":
            p.error("--detector c4 is Faster R-CNN (boxes): --task detect; instance masks take --detector fpn")
        if voc and args.task == "instance":
            p.error("--data voc has boxes, no instance masks: --task detect")
        if args.detector == "c4" and args.init_decoder:
            p.error("--init-decoder starts an FPN: --detector fpn (the C4 detector has no FPN)")
    if classification:  # the rest (batch, lr, epochs, features) depends on the network: main() resolves it
        args.crop_size = args.crop_size or 224
    elif detection:  # the 1x schedule
        args.batch_size = args.batch_size or 16
        args.iters = (90000 if coco else 24000 if voc else 2000) if args.iters is None else args.iters
        args.lr = 0.02 * args.batch_size / 16 if args.lr is None else args.lr
        args.weight_decay = 1e-4 if args.weight_decay is None else args.weight_decay
        if voc:  # MoCo's pascal_voc_R_50_C4_24k: x0.1 at 18k and 22k of 24k, warm-up 100
            args.steps = args.steps or [args.iters * 3 // 4, args.iters * 11 // 12]
        args.steps = args.steps or [args.iters * 2 // 3, args.iters * 8 // 9]  # the 1x: 60k, 80k of 90k
        args.warmup = min(100 if voc else 1000, args.iters // 10) if args.warmup is None else args.warmup
        args.train_sizes = args.train_sizes or (list(range(640, 801, 32)) if coco else list(range(480, 801, 32)) if voc
                                                else [args.synthetic_size])
        args.test_size = args.test_size or (800 if coco or voc else args.synthetic_size)
        args.proposals = args.proposals or (2000 if args.detector == "c4" else 1000)
    else:
        for k, v in seg_data.protocol(args).items():  # the dataset's protocol where a flag was not given
            if getattr(args, k) is None:
                setattr(args, k, list(v) if isinstance(v, (list, tuple)) else v)
        args.base_size = args.base_size or args.crop_size  # images scaled around the crop (Cityscapes: native)
    if args.steps is not None and args.iters:  # fractions of --iters (the protocols' form) -> iterations
        args.steps = [int(round(s * args.iters)) if s < 1 else int(s) for s in args.steps]
    common.check_args(p, args, positive=("iters", "batch_size", "lr", "crop_size", "synthetic_train", "synthetic_val",
                                         "synthetic_size", "log_every", "save_every", "k", "knn_temperature", "epochs",
                                         "n_last_blocks"),
                      non_negative=("workers", "aux_weight", "pictures", "weight_decay", "min_lr"))
    if args.val_resize is not None and 0 in args.val_resize:
        args.val_resize = None
    if args.slide is not None and 0 in args.slide:
        args.slide = None
    if args.slide is not None and args.slide[1] > args.slide[0]:
        p.error("--slide CROP STRIDE: the stride must not exceed the crop (windows would leave gaps)")
    if not classification:
        common.split_batch(p, args)
    if args.init_decoder and not detection and (args.task != "finetune" or args.head == "linear"):
        p.error("--init-decoder needs --task finetune --head fpn | fcn, or --task detect / instance")
    return args


def default_output_dir(args):
    """runs/eval/<init>-<task>[-<head>]-<data>-<hash>, the hash over every argument that changes the
    result, the --init weights' content hash (args.init_sha) among them: another configuration, or
    new weights under the same path, never resumes this folder's evaluation."""
    init = "random" if args.init == "random" else "-".join(Path(args.init).resolve().parts[-2:]).removesuffix(".pth")
    config = {k: v for k, v in sorted(vars(args).items()) if k not in common.NEUTRAL_ARGS}
    digest = hashlib.sha1(json.dumps(config, default=str).encode()).hexdigest()[:8]
    head = (f"-{args.head}" if args.task == "finetune" else "") + ("-decoder" if args.init_decoder else "")
    data = Path(os.path.abspath(args.data)).name or "data"  # a preset, or the last folder of a --data path (no symlink followed)
    return f"runs/eval/{init}-{args.task}{head}-{data}-{digest}"


def check_same_init(out, args):
    """Refuse to continue an evaluation in `out` that started from other --init weights."""
    stored = json.loads((Path(out) / "args.json").read_text()) if (Path(out) / "args.json").exists() else None
    if stored is not None and stored.get("init_sha") != args.init_sha:
        raise SystemExit(f"{out} holds an evaluation of other weights: --init {args.init} has changed since it started "
                         f"(content {str(stored.get('init_sha'))[:12]} then, {args.init_sha[:12]} now). Evaluate the new "
                         f"weights in a new folder: leave out --output-dir (the default name includes the weights' "
                         f"hash) or give another one.")



# =================================================================================================
# Model: dilated backbone, probe, FCN and FPN heads
# =================================================================================================
def dilate(trunk, output_stride):
    """Turn the strides of layer4 (and layer3 for stride 8) into dilations, in place (DeepLab)."""
    layers = {32: [], 16: [trunk.layer4], 8: [trunk.layer3, trunk.layer4]}[output_stride]
    dilation = 1
    for layer in layers:
        previous, dilation = dilation, dilation * 2
        for b, block in enumerate(layer):
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    # the first 3x3 conv of the layer keeps the previous dilation, as torchvision does
                    d = previous if b == 0 and conv is (block.conv2 if hasattr(block, "conv3") else block.conv1) else dilation
                    conv.dilation, conv.padding = (d, d), (d, d)
    return trunk


def conv_bn_relu(cin, cout, k=3, d=1):
    """Conv (no bias) + BN + ReLU, mmsegmentation's ConvModule; a 3x3 conv padded by its dilation."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


FCN_HEADS = {  # mmsegmentation's FCNHead as the protocols configure it: (channels, dilation, concat_input, dropout)
    "d6": lambda c5: (256, 6, False, 0.0),  # fcn_d6_r50-d16 (SlotCon's VOC and Cityscapes)
    "d8": lambda c5: (512 if c5 >= 2048 else 256, 1, True, 0.1),  # fcn_r50-d8
}


class FCNHead(nn.Module):
    """FCN head of the mmsegmentation protocol: convs, concat with the input, fuse, dropout, classify."""

    def __init__(self, cin, channels, num_classes, num_convs=2, concat=True, dilation=1, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(cin if i == 0 else channels, channels, d=dilation)
                                     for i in range(num_convs)])
        self.fuse = conv_bn_relu(cin + channels, channels) if concat else None
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        for m in self.modules():  # mmcv's: ConvModule kaiming_init (normal, fan_out, relu); conv_seg N(0, 0.01)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x):
        y = self.convs(x)
        if self.fuse is not None:
            y = self.fuse(torch.cat([x, y], 1))
        return self.classifier(y)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022) from the last block's patch tokens (stride p):
    strides p/4, p/2, p, 2p by two / one transposed 2x2 conv, identity, 2x2 max pool; then a 1x1 and
    a 3x3 conv to `out` channels per level (BatchNorm where ViTDet uses LayerNorm). Returns [P2..P5]
    for p = 16."""

    def __init__(self, dim, out=256):
        super().__init__()
        up = lambda c_in, c_out: nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.scales = nn.ModuleList([nn.Sequential(up(dim, dim // 2), nn.BatchNorm2d(dim // 2), nn.GELU(), up(dim // 2, dim // 4)),
                                     up(dim, dim // 2), nn.Identity(), nn.MaxPool2d(2)])
        self.outputs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out),
                                                   nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out))
                                     for c in (dim // 4, dim // 2, dim, dim))

    def forward(self, tokens):  # (B, D, h, w) -> 4 x (B, out, ...)
        return [conv(scale(tokens)) for scale, conv in zip(self.scales, self.outputs)]


class Segmenter(nn.Module):
    """Backbone + head. forward returns (logits, aux logits or None, dense features) at feature size.
    The probe (task probe) and the linear fine-tune (head linear) share one head: a BatchNorm without
    affine parameters and a 1x1 conv on `features(x)` (C5 or C3-C5 of a dilated ResNet, or a ViT's
    patch tokens); the probe keeps the backbone frozen."""

    def __init__(self, arch, task, head, num_classes, output_stride, aux=True, fpn_levels=("p2",), patch_size=16,
                 img_size=224, probe_layers="c5", fcn_head="d8"):
        super().__init__()
        self.task, self.vit, self.probe_layers = task, arch.startswith("vit"), probe_layers
        self.head_type = "linear" if task == "probe" else head
        if self.vit:  # ADCLR/DINO: the patch tokens, or a simple feature pyramid built from them
            if self.head_type == "fcn":
                raise ValueError(f"--arch {arch}: ViT backbones take --head linear or fpn (a simple feature pyramid)")
            self.backbone = common.ViT(arch, patch_size, img_size)
            dim = self.backbone.embed_dim
            if self.head_type == "fpn":
                self.decoder = SimplePyramid(dim, 256)
                self.head = nn.Sequential(conv_bn_relu(256, 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))
            else:
                self.head = nn.Sequential(nn.BatchNorm2d(dim, affine=False), nn.Conv2d(dim, num_classes, 1))
            return
        self.backbone = dilate(common.ResNetTrunk(arch, pyramid=True), output_stride if head != "fpn" or task == "probe" else 32)
        c = self.backbone.channels
        if self.head_type == "linear":
            width = c[3] if probe_layers == "c5" else sum(c[1:])
            self.head = nn.Sequential(nn.BatchNorm2d(width, affine=False), nn.Conv2d(width, num_classes, 1))
        elif head == "fcn":
            width, dilation, concat, dropout = FCN_HEADS[fcn_head](c[3])
            self.head = FCNHead(c[3], width, num_classes, concat=concat, dilation=dilation, dropout=dropout)
            aux_width = 256 if c[2] >= 1024 else 128  # fcn_r50-d8's auxiliary head on C4: 256 channels, one conv
            self.aux = FCNHead(c[2], aux_width, num_classes, num_convs=1, concat=False) if aux else None
        else:
            self.decoder = common.FPN(c, 256, fpn_levels)  # P2 feeds the head; a pre-trained decoder may bring more
            self.head = nn.Sequential(conv_bn_relu(256, 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))

    def features(self, x):
        """The linear head's input: (B, D, h, w) patch tokens, C5, or C3-C5 upsampled to C3's size."""
        if self.vit:
            tokens = self.backbone(x)[:, 1:]  # (B, h·w, D) patch tokens
            h, w = x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size
            return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D, h, w)
        feats = self.backbone(x)
        if self.probe_layers == "c5":
            return feats[3]
        size = feats[1].shape[-2:]
        return torch.cat([feats[1]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[2:]], 1)

    def forward(self, x):
        if self.head_type == "linear":
            with torch.set_grad_enabled(self.task == "finetune" and torch.is_grad_enabled()):  # the probe: frozen
                feat = self.features(x)
            return self.head(feat), None, feat
        if self.vit:  # fpn on the simple pyramid's stride-p/4 level
            p2 = self.decoder(self.features(x))[0]
            return self.head(p2), None, p2
        feats = self.backbone(x)
        if self.head_type == "fcn":
            return self.head(feats[3]), self.aux(feats[2]) if self.aux is not None and self.training else None, feats[3]
        p2 = self.decoder(feats)[0]  # levels are sorted: p2 first
        return self.head(p2), None, p2


def load_decoder(model, meta, args):
    """--init-decoder: the pre-trained decoder into the segmentation head, every tensor of it. An FPN
    (DeCon, MCL) into --head fpn's FPN; an FCN (DeCon --decoder fcn, or the DeCon authors' FCN
    decoder) into --head fcn's two convs, which must have its width and dilation (--fcn-head)."""
    cfg, state = meta.get("decoder_cfg") or {}, meta.get("decoder")
    kind = "fpn" if args.head == "fpn" else "fcn"
    if state is None or cfg.get("type") != kind:
        raise SystemExit(f"--init-decoder --head {args.head}: {args.init} holds no pre-trained {kind.upper()} decoder "
                         f"(method {meta.get('method')}, decoder: {cfg.get('type') or 'none'})")
    if kind == "fpn":
        return model.decoder.load_state_dict(state, strict=True)
    width, dilation = model.head.convs[0][0].out_channels, model.head.convs[0][0].dilation[0]
    if (cfg.get("out_channels"), cfg.get("dilation")) != (width, dilation):
        raise SystemExit(f"--init-decoder: the FCN decoder has {cfg.get('out_channels')} channels at dilation "
                         f"{cfg.get('dilation')}, --fcn-head {args.fcn_head} {width} at {dilation}: pass --fcn-head "
                         f"{'d6' if cfg.get('dilation') == 6 else 'd8'} (or pre-train the decoder to match)")
    # decon.fcn_decoder's Sequential (conv, BN, ReLU, conv, BN, ReLU) -> FCNHead.convs ((conv, BN, ReLU) x 2)
    convs = {f"{int(k.split('.')[0]) // 3}.{int(k.split('.')[0]) % 3}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    model.head.convs.load_state_dict(convs, strict=True)


# =================================================================================================
# Metrics and pictures
# =================================================================================================
def confusion(pred, label, num_classes):
    """(num_classes, num_classes) counts, rows = ground truth, ignoring labels >= num_classes."""
    valid = label < num_classes
    idx = label[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def metrics_from_confusion(conf, names):
    """mIoU over classes that occur (in ground truth or prediction), per-class IoU, pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union  # NaN where a class is neither in the ground truth nor predicted
    if conf.sum() == 0:  # every validation pixel is ignored: no score (JSON null, not NaN)
        return {"mIoU": None, "pixel_accuracy": None, "per_class_IoU": {n: None for n in names}}
    return {"mIoU": float(torch.nanmean(iou)) * 100, "pixel_accuracy": float(tp.sum() / conf.sum()) * 100,
            "per_class_IoU": {n: (None if torch.isnan(v) else float(v) * 100) for n, v in zip(names, iou)}}


def slide_logits(model, x, crop, stride, dtype, device, align_corners=False):
    """mmsegmentation's slide inference on one image (1, 3, H, W): windows of `crop` every `stride`,
    the last one flush with the border, logits (upsampled to each window) averaged where they overlap."""
    H, W = x.shape[-2:]
    starts = lambda n: sorted({min(i * stride, max(n - crop, 0)) for i in range(max(n - crop + stride - 1, 0) // stride + 1)})
    logits, count, feat = None, torch.zeros(1, 1, H, W, device=x.device), None
    for top in starts(H):
        for left in starts(W):
            window = x[..., top:top + crop, left:left + crop]
            with common.autocast(device, dtype):
                out, _, f = model(window)
            out = F.interpolate(out.float(), size=window.shape[-2:], mode="bilinear", align_corners=align_corners)
            if logits is None:
                logits, feat = torch.zeros(1, out.shape[1], H, W, device=x.device), f  # the first window's features: pictures only
            logits[..., top:top + crop, left:left + crop] += out
            count[..., top:top + crop, left:left + crop] += 1
    return logits / count, feat  # (1, K, H, W)


@torch.no_grad()
def evaluate(model, loader, num_classes, names, args, dtype, device, pictures_path=None):
    """Confusion matrix over the validation set (summed over ranks) -> metrics; draws the pictures.
    Every image is scored at its own size, unpadded, as mmsegmentation tests (one image per GPU, no
    Pad in the protocols' test pipelines): its logits resized to the input, then to the label, both
    with --align-corners. Images of one size share a forward (BatchNorm in eval mode: the numbers of
    one image at a time), so the score does not depend on the batch."""
    model.eval()
    align = args.align_corners == "on"
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    rows = []
    for batch in common.progress(loader, 0, 1):  # [(image (3, h, w), label (H, W))]
        for _, run in itertools.groupby(batch, key=lambda pair: pair[0].shape):
            run = list(run)
            x = torch.stack([img for img, _ in run]).to(device)  # (b, 3, h, w), one size
            if args.slide is None:
                with common.autocast(device, dtype):
                    logits, _, feat = model(x)
                logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=align)
            for i, (_, y) in enumerate(run):
                if args.slide is not None:  # mmsegmentation's slide mode, each image alone
                    logits_i, feat_i = slide_logits(model, x[i:i + 1], *args.slide, dtype, device, align)
                else:
                    logits_i, feat_i = logits[i:i + 1], feat[i:i + 1]
                y = y.to(device)
                pred = F.interpolate(logits_i, size=y.shape, mode="bilinear", align_corners=align).argmax(1)[0]  # (H, W)
                conf += confusion(pred, y, num_classes)
                if pictures_path and len(rows) < args.pictures:
                    rows.append((x[i].cpu(), y.cpu(), pred.cpu(), feat_i[0].float().cpu()))
    if common.world_size() > 1:
        dist.all_reduce(conf)
    if pictures_path and common.is_main() and rows:
        pictures.save_segmentation(rows, num_classes, pictures_path, args.input_norm)
    model.train()
    return metrics_from_confusion(conf.cpu(), names)


# =================================================================================================
# Train step
# =================================================================================================
def lr_at(step, args):
    """The protocol's lr at `step`: x0.1 at each of --steps (mmsegmentation's step policy), else poly
    0.9 from --lr down to --min-lr: (lr - min_lr)(1 - step / iters)^0.9 + min_lr."""
    if args.steps:
        return args.lr * 0.1 ** sum(step >= s for s in args.steps)
    return (args.lr - args.min_lr) * (1 - step / args.iters) ** 0.9 + args.min_lr


def seg_loss(logits, y, args):
    """Cross-entropy of logits resized to the labels. Fine-tuning takes mmsegmentation's
    CrossEntropyLoss: the mean over every pixel, ignored ones counting zero (avg_non_ignore off), so
    padding and ignored pixels lower the loss and its gradient as in the protocols; the probe (this
    project's protocol) takes the mean over the labelled pixels."""
    logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=args.align_corners == "on")
    if args.task == "probe":
        return F.cross_entropy(logits, y, ignore_index=seg_data.IGNORE)
    return F.cross_entropy(logits, y, ignore_index=seg_data.IGNORE, reduction="none").mean()


def train_step(x, y, model, optimizer, scaler, args, dtype, device):
    """One segmentation iteration; returns the loss tensor (no host sync)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with common.autocast(device, dtype):
        logits, aux, _ = model(x)
        loss = seg_loss(logits, y, args)
        if aux is not None:
            loss = loss + args.aux_weight * seg_loss(aux, y, args)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# =================================================================================================
# Main
# =================================================================================================
def main(argv=None):
    args = get_args(argv)
    if args.export:
        return weights.export(args)
    args.init_sha = weights.init_digest(args.init)  # the weights' identity: part of the folder name and the resume check
    if args.task in ("detect", "instance"):  # detection.py: R-CNN, COCO AP
        from evaluation import detection
        args.output_dir = args.output_dir or default_output_dir(args)
        check_same_init(args.output_dir, args)
        return detection.run(args)
    backbone_state, meta = weights.load_init(args.init)
    arch = args.arch or meta.get("arch") or "resnet50"
    if args.task in ("knn", "linear"):  # image classification on frozen features
        from evaluation import classification
        classification.defaults(args, arch)
        args.output_dir = args.output_dir or default_output_dir(args)
        check_same_init(args.output_dir, args)
        return classification.run(args, backbone_state, meta, arch)
    if args.task == "finetune" and args.head is None:  # an FCN on C5 for a ResNet; a ViT has no C5
        args.head = "fpn" if arch.startswith("vit") else "fcn"
    if arch.startswith("vit") and args.task == "finetune" and args.head == "fcn":
        raise SystemExit(f"--head fcn needs a ResNet's C4/C5; --arch {arch} takes --head fpn (a simple feature "
                         f"pyramid from the patch tokens, the default) or --head linear")
    args.output_dir = args.output_dir or default_output_dir(args)
    check_same_init(args.output_dir, args)
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out = common.prepare_output(args, __file__)
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)
    train_loader, val_loader, num_classes, names = seg_data.build_data(args, device)
    levels = (meta.get("decoder_cfg") or {}).get("levels", ["p2"]) if args.init_decoder else ["p2"]
    img_size = meta.get("img_size", args.crop_size if args.init == "random" else 224)  # a ViT's positional table
    patch_size = args.patch_size or meta.get("patch_size", 16)
    if arch.startswith("vit") and backbone_state is not None:  # a file without metadata: read off its tensors
        patch_size, img_size = weights.vit_geometry(backbone_state, meta, args.patch_size)
    model = Segmenter(arch, args.task, args.head, num_classes, args.output_stride, aux=args.aux_weight > 0,
                      fpn_levels=levels, patch_size=patch_size, img_size=img_size,
                      probe_layers=args.probe_layers, fcn_head=args.fcn_head).to(device)
    if backbone_state is not None:
        weights.load_backbone(model.backbone, backbone_state, arch, meta, args.init)
    if args.init_decoder:
        load_decoder(model, meta, args)
    if args.task == "probe":
        model.backbone.requires_grad_(False).eval()
    else:  # the papers' detectron2/mmsegmentation configs use SyncBN (under torchrun on CUDA)
        model = common.sync_batchnorm(model, True)
    common.seed_everything(args.seed + rank)  # the same weights on every rank; from here each draws its own dropout
    common.print0(f"eval_dense | {args.task} ({args.head if args.task == 'finetune' else 'linear'}) | init "
                  f"{args.init} ({meta.get('method')}, {arch}) | {args.data}: {num_classes} classes, "
                  f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val | "
                  + (f"{args.probe_epochs} epochs on cached features" if args.probe_cache else f"{args.iters} iters")
                  + f" | device {device}")
    common.print0("protocol | train: " + ("the scenes as generated, no augmentation (--probe-cache)" if args.probe_cache else
                  f"short side {args.base_size} x {args.scale_range}, crop {args.crop_size}, cat-max "
                  f"{args.cat_max}, photometric {args.photometric}") + " | test: "
                  + (f"slide {args.slide[0]}/{args.slide[1]}" if args.slide else "whole image")
                  + (f" resized to fit {args.val_resize[0]} x {args.val_resize[1]}" if args.val_resize else " at native size"))

    if args.probe_cache:  # the frozen features once, then the linear head to convergence on them
        common.write_run_record(out, args)
        cached_probe(model, args, device, dtype, log)
        return finish(model, val_loader, num_classes, names, meta, arch, args, dtype, device, out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, foreach=True)
                 if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ckpt_path = out / "checkpoint.pth"
    step, _ = common.resume(ckpt_path, {"model": model}, optimizer, scaler, device, args, log)
    save = lambda: common.save_checkpoint(ckpt_path, {"model": model}, optimizer, scaler, step, args, losses=running)

    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.task == "finetune") if world > 1 else model
    if args.task == "probe":
        model.backbone.eval()  # frozen statistics: the probe measures the features as they are
    running, tick, tick_step = torch.zeros((), device=device), time.time(), step
    common.catch_stop_signals()  # SIGINT / SIGTERM: finish the step, save, exit
    steps_per_epoch = len(train_loader)  # before a mid-epoch resume shortens the sampler
    epoch, epochs = step // steps_per_epoch, -(-args.iters // steps_per_epoch)
    while step < args.iters:
        train_loader.sampler.set_epoch(epoch)
        train_loader.sampler.skip = (step - epoch * steps_per_epoch) * args.batch_per_rank
        bar = common.progress(train_loader, epoch, epochs)
        for x, y in bar:
            if step >= args.iters:
                break
            lr = lr_at(step, args)
            for g in optimizer.param_groups:
                g["lr"] = lr
            running += train_step(x, y, net, optimizer, scaler, args, dtype, device)
            step += 1
            stop = common.stop_requested()  # the same on every rank
            if step % args.log_every == 0 or step == args.iters or stop:
                common.check_finite(running, {"model": model}, step, ckpt_path)  # stops the run on NaN/inf
                loss = common.mean_over_ranks(running).item() / (step - tick_step)
                speed = (step - tick_step) * args.batch_size / (time.time() - tick)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}", img_s=common.format_rate(speed))
                log.write(step=step, loss=loss, lr=lr, images_per_s=speed)
                running.zero_()
                tick, tick_step = time.time(), step
            if step % args.save_every == 0 or stop:
                save()
            if stop:
                common.exit_on_signal(stop, step, ckpt_path)
        train_loader.sampler.skip = 0
        epoch += 1
    save()
    if args.task == "finetune" and common.is_main():  # the fine-tuned backbone, in the downstream format
        name = "supervised" if args.init == "random" else f"{meta.get('method')}+finetune"
        common.save_downstream(out / "downstream.pth", name, arch, model.backbone,
                               extra={"patch_size": model.backbone.patch_size, "img_size": img_size}
                               if model.vit else None)
    return finish(model, val_loader, num_classes, names, meta, arch, args, dtype, device, out)


def finish(model, val_loader, num_classes, names, meta, arch, args, dtype, device, out):
    """Evaluate on the validation split, write metrics.json and the pictures, print the table."""
    results = evaluate(model, val_loader, num_classes, names, args, dtype, device, out / "predictions.png")
    results.update(task=args.task, head=args.head if args.task == "finetune" else "linear", init=args.init,
                   method=meta.get("method"), arch=arch, data=args.data, iters=args.iters, init_decoder=args.init_decoder,
                   patch_size=model.backbone.patch_size if model.vit else None, probe_layers=args.probe_layers,
                   probe_cache=args.probe_cache)
    if common.is_main():
        (out / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False))
        print("\n| class | IoU |\n|---|---|")
        for n, v in results["per_class_IoU"].items():
            print(f"| {n} | {'-' if v is None else f'{v:.1f}'} |")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"\nmIoU {fmt(results['mIoU'])}  pixel accuracy {fmt(results['pixel_accuracy'])}  "
              f"({args.init}, {args.task}) -> {out / 'metrics.json'}" + (f", {out / 'predictions.png'}" if args.pictures else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
