r"""DeCon over DenseCL: DenseCL's encoder losses plus a decoder with its own dense contrastive loss.

Paper: Quetin, Ghosh, Maleki, "Beyond the Encoder: Joint Encoder-Decoder Contrastive Pre-Training
Improves Dense Prediction", 2025, https://arxiv.org/abs/2503.17526. Official code:
https://github.com/sebquetin/DeCon. DeCon adapts existing frameworks; its headline is SlotCon
(decon.py). The paper also reports DenseCL (Wang et al., CVPR 2021, https://arxiv.org/abs/2011.09157,
code https://github.com/WXinlong/DenseCL), which this file adapts.

Method. densecl.py (MoCo v2 plus a dense InfoNCE between argmax-matched locations of the two
views, with a queue of pooled dense keys) is the encoder's loss. A decoder (an FPN over C2-C5 keeping
P2, or P2-P5 with --deep-supervision; or an FCN on C5) gets its own dense head, its own dense queue
and its own argmax matching on the decoder output. The total is alpha·L_encoder + (1 - alpha)·
L_decoder (mean over decoder levels), alpha = 0.5: the objectives do not share heads, and both
gradients reach the shared encoder. --decoder none is DenseCL itself, in this file's code.

Launch:
    python decon_densecl.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 --synthetic-len 2048 \
        --queue-size 4096                                              # CPU demo, a few minutes
    python decon_densecl.py --data /path/to/images                     # your images
    torchrun --nproc_per_node=8 decon_densecl.py --data coco            # 800 epochs, lr 0.3 x N/256
    torchrun --nproc_per_node=8 decon_densecl.py --data coco --deep-supervision --skip-channel-dropout 0.5
    torchrun --nproc_per_node=8 decon_densecl.py --data coco --decoder none   # the DenseCL baseline

Reference results (abstract; the DenseCL and SlotCon versions are reported together): COCO det
+0.37 AP, COCO inst seg +0.32 AP, VOC seg +1.42 mIoU, Cityscapes +0.50 mIoU over the framework
without decoder. Not reproduced here.

Deviations and choices: the losses run in fp32 outside autocast; --gpu-augment as densecl.py. This
file's own choices, where neither DenseCL's code nor decon.py's decides: the decoder's dense heads
are DenseCL's dense head at the decoder's width (256), each with its own queue of pooled keys; the
decoder runs in the key encoder too (shuffle BN applies to the whole network); downstream gets the
query encoder and decoder, as DenseCL's conversion.

Checked against DenseCL's code as densecl.py is (read its docstring): the key encoder is an EMA
(m = 0.999, before the keys are computed), shuffle BN under DDP (emulated in one process with --bn-splits, as densecl.py), queues
of 65536 with one pooled dense key per image, T = 0.2, lambda = 0.5, MoCo v2 augmentation, SGD lr
0.03 x N/256 (0.3 on COCO) cosine per epoch, OpenSelfSup init. The decoder is built as decon.py's
(detectron2's c2_xavier_fill for the FPN convs).
"""
import argparse
import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="DeCon over DenseCL pre-training",
                                formatter_class=common.HelpFormatter)
    p.add_argument("--decoder", default="fpn", choices=["fpn", "fcn", "none"], help="none = plain DenseCL (the baseline)")
    p.add_argument("--deep-supervision", action="store_true", help="DeCon-ML: heads on P2-P5 (default DeCon-SL: P2 only)")
    p.add_argument("--skip-channel-dropout", type=float, default=0.0, help="Dropout2d on FPN skip connections (ML runs: 0.5)")
    p.add_argument("--skip-dropout", type=float, default=0.0, help="drop whole FPN skip maps (exclusive with the above)")
    p.add_argument("--fcn-channels", type=int, default=256, help="FCN decoder width (ADE20K setting: 512)")
    p.add_argument("--fcn-dilation", type=int, default=6, help="dilation of the FCN decoder's 3x3 convs")
    p.add_argument("--encoder-loss-weight", type=float, default=0.5, help="alpha in alpha·L_enc + (1-alpha)·L_dec")
    p.add_argument("--arch", default="resnet50", choices=common.RESNET_ARCHS, help="backbone (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop side (paper: 224)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension of every head (DenseCL: 128)")
    p.add_argument("--queue-size", type=int, default=65536, help="length K of each queue (DenseCL: 65536)")
    p.add_argument("--momentum", type=float, default=0.999, help="key encoder EMA momentum m (DenseCL: 0.999)")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature (DenseCL: 0.2)")
    p.add_argument("--loss-lambda", type=float, default=0.5, help="dense weight in the encoder's loss (DenseCL: 0.5)")
    common.add_bn_splits_arg(p)
    p.add_argument("--lr", type=float, default=None,
                   help="absolute SGD lr; unset: 0.03 x batch/256 (ImageNet recipe), 0.3 x batch/256 on COCO")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(DenseCL: 1e-4)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/decon-densecl on the synthetic scenes, "
                        "runs/decon-densecl-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=None, batch_size=256, epochs_help="training epochs (default: 800 on COCO, 200 otherwise)")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("decon-densecl", args.data)
    common.check_args(p, args, positive=("lr", "queue_size", "dim", "temperature", "fcn_channels", "bn_splits"),
                      non_negative=("weight_decay", "loss_lambda", "skip_dropout", "skip_channel_dropout"))
    common.check_image_size(p, args, dense=True)
    if args.skip_channel_dropout > 0 and args.skip_dropout > 0:
        p.error("--skip-channel-dropout and --skip-dropout are mutually exclusive")
    if (args.skip_channel_dropout or args.skip_dropout or args.deep_supervision) and args.decoder != "fpn":
        p.error("skip-connection dropout and --deep-supervision need --decoder fpn")
    if args.decoder != "none" and args.encoder_loss_weight >= 1:
        p.error("--encoder-loss-weight 1 leaves the decoder without a loss; use --decoder none for plain DenseCL")
    # Derived values, computed once.
    args.alpha = 1.0 if args.decoder == "none" else args.encoder_loss_weight
    coco = args.data in ("coco", "coco+")
    common.split_batch(p, args)
    common.check_bn_splits(p, args)
    if args.queue_size < args.batch_size:
        p.error(f"--queue-size {args.queue_size} is smaller than the global batch {args.batch_size}: one push would "
                f"write some queue slots twice (nondeterministic on CUDA); use a queue of at least one global batch")
    args.epochs = args.epochs if args.epochs is not None else (800 if coco else 200)
    args.lr = args.lr if args.lr is not None else (0.3 if coco else 0.03) * args.batch_size / 256
    return args


# =================================================================================================
# Data
# =================================================================================================
def build_data(args, device):
    """Two independent MoCo v2 "aug-plus" views of every image, as DenseCL. Returns the loader and, with --gpu-augment, the device-side
    augmentation (common.py, section 7) its decoded batches go through."""
    if args.gpu_augment:
        dataset = common.build_pretrain_dataset(args, common.DecodeOnly(args.max_side))
        return (common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device, common.pad_collate),
                common.MoCoV2Views(args.image_size))
    dataset = common.build_pretrain_dataset(args, common.TwoViews(common.moco_v2_augmentation(args.image_size)))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device), None


# =================================================================================================
# Model
# =================================================================================================
def fcn_decoder(cin, channels=256, dilation=6):
    """FCN decoder on C5: two 3x3 conv-BN-ReLU (dilated), as the FCN-D6 segmentation head."""
    conv = lambda i: nn.Conv2d(i, channels, 3, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(conv(cin), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         conv(channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DenseHead(nn.Module):
    """DenseCL neck on one feature map: a global MLP (the encoder head only) and a dense 1x1-conv
    head, no BN; Linears kaiming fan_in, convs PyTorch's default, as DenseCL's neck.
    forward: (B, C, h, w) -> features (B, C, S²), global (B, D) or None, dense grid (B, D, S²)."""

    def __init__(self, cin, dim, with_global):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(inplace=True), nn.Conv2d(cin, dim, 1))
        self.glob = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(inplace=True), nn.Linear(cin, dim)) if with_global else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        grid = self.dense(x).flatten(2)
        return x.flatten(2), self.glob(x.mean((2, 3))) if self.glob is not None else None, grid


class Network(nn.Module):
    """Encoder, optional decoder, one DenseHead per supervised output. Query and key encoder alike.

    Head order: heads[0] is the encoder head (on C5, with the global MLP) when alpha > 0; the
    decoder heads follow (FPN P2 first, or the FCN output)."""

    def __init__(self, args):
        super().__init__()
        self.encoder = common.ResNetTrunk(args.arch, pyramid=args.decoder == "fpn", conv_init="fan_in")
        c5 = self.encoder.out_channels
        self.decoder, dec_channels = None, []
        if args.decoder == "fpn":
            levels = ["p2", "p3", "p4", "p5"] if args.deep_supervision else ["p2"]  # DeCon-ML or DeCon-SL
            p = args.skip_channel_dropout or args.skip_dropout
            self.decoder = common.FPN(self.encoder.channels, 256, levels, p, "channel" if args.skip_channel_dropout else "map")
            for m in self.decoder.modules():  # detectron2's c2_xavier_fill, as decon.py
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=1)
            dec_channels = [256] * len(levels)
        elif args.decoder == "fcn":
            self.decoder = fcn_decoder(c5, args.fcn_channels, args.fcn_dilation)
            dec_channels = [args.fcn_channels]
        self.with_encoder_head = args.alpha > 0
        cins = ([c5] if self.with_encoder_head else []) + dec_channels
        self.heads = nn.ModuleList(DenseHead(c, args.dim, with_global=self.with_encoder_head and i == 0)
                                   for i, c in enumerate(cins))

    def decoder_config(self, args):
        if args.decoder == "fpn":
            return self.decoder.config
        return {"type": args.decoder, "in_channels": self.encoder.out_channels, "out_channels": args.fcn_channels,
                "dilation": args.fcn_dilation} if args.decoder == "fcn" else None

    def forward(self, x):
        feats = self.encoder(x)
        c5 = feats[-1] if isinstance(feats, list) else feats
        outputs = [c5] if self.with_encoder_head else []
        if isinstance(self.decoder, common.FPN):
            outputs += self.decoder(feats)
        elif self.decoder is not None:
            outputs.append(self.decoder(c5))
        return [head(o) for head, o in zip(self.heads, outputs)]


class Queue(nn.Module):
    """FIFO of L2-normalised keys, stored (D, K), with a write pointer on the device."""

    def __init__(self, dim, size):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(dim, size), dim=0))  # (D, K)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, k):  # (N, D): overwrite the oldest N columns
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % self.keys.shape[1]
        self.keys.index_copy_(1, idx, k.T.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + k.shape[0]) % self.keys.shape[1])


@torch.no_grad()
def momentum_update(key_params, query_params, m):
    """key <- m·key + (1 - m)·query over encoder, decoder and heads, one fused foreach kernel."""
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle BN under DDP: this rank's slice of a permutation of all ranks' key images made on rank 0,
    and the indices that undo it. It hides from the key encoder's BatchNorm which keys share the
    query's batch (a shortcut for the InfoNCE)."""
    B, W = x.shape[0], common.world_size()
    x_all = common.concat_all_gather(x)  # (N, 3, H, W)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    return x_all[perm.view(W, B)[dist.get_rank()]], torch.argsort(perm).view(W, B)[dist.get_rank()]


# =================================================================================================
# Loss
# =================================================================================================
class QueueInfoNCE(torch.autograd.Function):
    """InfoNCE against a queue without storing the (M, K) logits (as densecl.py): chunks of the
    queue stay in cache, the softmax's sums are shifted by each row's running maximum (no exp over-
    or underflows at any temperature), and the gradient (sum_j p_j x_j - k) / (T·M) is accumulated
    on the way."""

    @staticmethod
    def forward(ctx, q, k, queue, temperature, chunk=4096):
        with torch.autocast(q.device.type, enabled=False):
            qs, k, queue = q.float() / temperature, k.float(), queue.float()  # (M, D), (M, D), (D, K)
            l_pos = (qs * k).sum(1)  # (M,)
            top, z, u = l_pos.clone(), torch.ones_like(l_pos), k.clone()  # running max, sum exp, sum exp·x
            for c in range(0, queue.shape[1], chunk):
                keys = queue[:, c:c + chunk]
                logits = qs @ keys  # (M, chunk)
                new_top = torch.maximum(top, logits.amax(1))
                rescale = torch.exp(top - new_top)
                e = logits.sub_(new_top[:, None]).exp_()  # (M, chunk)
                z, u, top = z * rescale + e.sum(1), torch.addmm(u * rescale[:, None], e, keys.T), new_top
            ctx.save_for_backward(((u / z[:, None] - k) / (temperature * q.shape[0])).to(q.dtype))
            return (torch.log(z) + top - l_pos).mean()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None, None, None, None


@common.fp32
def dense_loss(q_feat, q_grid, k_feat, k_grid, queue, temperature):
    """DenseCL's dense loss (Eq. 2-3) on one head: each query location is matched to the key
    location with the most similar feature (the head's input: C5 or the decoder map), then
    InfoNCE against the queue. feats (B, C, S²), grids (B, D, S²), all L2-normalised."""
    B, D, S2 = q_grid.shape
    with torch.no_grad():  # the match is an index: no gradient flows through it
        match = torch.einsum("bcq,bck->bqk", q_feat, k_feat).argmax(2)  # (B, S²)
    k_matched = torch.gather(k_grid, 2, match.unsqueeze(1).expand(B, D, S2))  # (B, D, S²)
    return QueueInfoNCE.apply(q_grid.transpose(1, 2).reshape(-1, D), k_matched.transpose(1, 2).reshape(-1, D),
                              queue, temperature)


@common.fp32
def global_loss(q, k, queue, temperature):
    """MoCo's InfoNCE (Eq. 1): q, k (B, D) normalised, queue (D, K); the positive is column 0."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / temperature  # (B, 1+K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def head_weights(args, num_heads):
    """Weight of each head's loss: alpha for the encoder head, (1 - alpha) / levels for decoder heads."""
    n_dec = num_heads - (1 if args.alpha > 0 else 0)
    return ([args.alpha] if args.alpha > 0 else []) + [(1 - args.alpha) / max(n_dec, 1)] * n_dec


@common.fp32
def decon_losses(out_q, out_k, global_queue, dense_queues, weights, args):
    """Every head's loss, fp32. out_q, out_k: per head (features (B, C, S²), global (B, D) or None,
    grid (B, D, S²)). The encoder head (index 0 when alpha > 0) adds the global InfoNCE with its
    own queue: (1 - lambda) global + lambda dense, as densecl.py; decoder heads are dense only.
    Returns (total, per-head losses (H,), the keys to enqueue: global (B, D) or None, dense per head)."""
    total, per_head, dense_keys, global_keys = 0.0, [], [], None
    for h, (o_q, o_k) in enumerate(zip(out_q, out_k)):
        # autocast's bf16 outputs to fp32 before normalising (common.fp32 casts only top-level arguments)
        (q_feat, q_glob, q_grid), (k_feat, k_glob, k_grid) = ([None if t is None else t.float() for t in o] for o in (o_q, o_k))
        q_feat, q_grid = F.normalize(q_feat, dim=1), F.normalize(q_grid, dim=1)
        with torch.no_grad():
            dense_keys.append(F.normalize(k_grid.mean(2), dim=1))  # the raw grid pooled, one key per image (DenseCL)
            k_feat, k_grid = F.normalize(k_feat, dim=1), F.normalize(k_grid, dim=1)
        loss = dense_loss(q_feat, q_grid, k_feat, k_grid, dense_queues[h].keys, args.temperature)
        if q_glob is not None:  # the encoder head
            global_keys = F.normalize(k_glob, dim=1)
            l_global = global_loss(F.normalize(q_glob, dim=1), global_keys, global_queue.keys, args.temperature)
            loss = (1 - args.loss_lambda) * l_global + args.loss_lambda * loss
        total = total + weights[h] * loss
        per_head.append(loss.detach())
    return total, torch.stack(per_head), global_keys, dense_keys


# =================================================================================================
# Train step
# =================================================================================================
def schedule(args, steps_per_epoch):
    """The lr of every step, DenseCL's (mmcv's CosineAnnealing by epoch, min_lr 0): lr·(1 +
    cos(pi·e/E))/2 for epoch e of E, held over the epoch; no warm-up."""
    return common.cosine_schedule(args.lr, 0.0, args.epochs, steps_per_epoch, per_step=False)


class State(NamedTuple):
    """What a step reads and updates, besides its views."""
    net_q: nn.Module  # the query network (encoder + decoder) as trained (DDP / torch.compile wrap it)
    net_k: nn.Module  # the key network: an EMA of the query network, never trained by gradients
    global_queue: "Queue"  # the encoder head's keys of earlier batches
    dense_queues: nn.ModuleList  # one queue of pooled dense keys per dense head
    weights: list  # the heads' loss weights (head_weights)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(views, s, args):
    """One iteration: EMA, query/key forward (autocast), fp32 losses, update, enqueue. Returns the
    total loss and one per head, (1 + H,) (no host sync)."""
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    x_q, x_k = (v.to(s.device, non_blocking=True, memory_format=memory_format) for v in views)  # (B, 3, H, W)
    with common.autocast(s.device, s.dtype):
        out_q = s.net_q(x_q)  # per head: (features, global or None, grid)
        with torch.no_grad():
            momentum_update(list(s.net_k.parameters()), list(s.net_q.parameters()), args.momentum)
            if common.world_size() > 1:
                x_k, unshuffle = batch_shuffle(x_k)
                out_k = [[None if t is None else common.concat_all_gather(t.float())[unshuffle] for t in o]
                         for o in s.net_k(x_k)]
            elif args.bn_splits > 1:  # shuffle BN emulated: the key of image n lands in a random BatchNorm group
                perm = torch.randperm(x_k.shape[0], device=s.device)  # (B,)
                out_k = [[None if t is None else t[torch.argsort(perm)] for t in o] for o in s.net_k(x_k[perm])]
            else:
                out_k = s.net_k(x_k)
    loss, per_head, global_keys, dense_keys = decon_losses(out_q, out_k, s.global_queue, s.dense_queues, s.weights, args)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    for queue, keys in zip(s.dense_queues, dense_keys):  # after backward: the loss graph has read the old queues
        queue.push(common.concat_all_gather(keys))
    if global_keys is not None:
        s.global_queue.push(common.concat_all_gather(global_keys))
    return torch.cat([loss.detach().view(1), per_head])


# =================================================================================================
# Main
# =================================================================================================
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)  # the same initial weights and queues on every rank
    out = common.prepare_output(args, __file__)
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)

    loader, device_views = build_data(args, device)
    steps_per_epoch = len(loader)
    lr_schedule = schedule(args, steps_per_epoch)

    net_q = Network(args)
    if world == 1:  # per-group BatchNorm statistics (encoder and decoder), as per-GPU ones under torchrun
        common.split_batchnorm(net_q, args.bn_splits)
    net_q = net_q.to(device)
    net_k = copy.deepcopy(net_q).requires_grad_(False)  # the key network
    n_heads = len(net_q.heads)
    weights = head_weights(args, n_heads)
    global_queue = Queue(args.dim, args.queue_size).to(device)  # the encoder head's (unused with alpha = 0)
    dense_queues = nn.ModuleList(Queue(args.dim, args.queue_size) for _ in range(n_heads)).to(device)
    if device.type == "cuda":
        net_q.to(memory_format=torch.channels_last)
        net_k.to(memory_format=torch.channels_last)
    # Every rank starts from the same weights and queues (seeded above); from here on each rank draws
    # its own random numbers (augmentations, shuffles), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    common.print0(f"DeCon over DenseCL | decoder {args.decoder}{' (ML)' if args.deep_supervision else ''} | {n_heads} "
                  f"heads, weights {[round(w, 3) for w in weights]} | {args.arch} {args.image_size}px | {world} x "
                  f"{args.batch_per_rank} images | lr {args.lr:g} | {args.epochs} epochs x {steps_per_epoch} steps | "
                  f"{common.precision_name(dtype)} | device {device} | output {out}")
    optimizer = torch.optim.SGD(net_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"net_q": net_q, "net_k": net_k, "global_queue": global_queue, "dense_queues": dense_queues},
                       optimizer, scaler, args, log, steps_per_epoch, device,
                       rest_name="head_losses")  # resumes here if a checkpoint exists
    model_q = nn.parallel.DistributedDataParallel(net_q) if world > 1 else net_q
    s = State(torch.compile(model_q) if args.compile else model_q, net_k, global_queue, dense_queues, weights, optimizer,
              scaler, dtype, device)

    for epoch, views in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> the method's views, on the device
            views = device_views(views, device)
        lr = lr_schedule[loop.step]
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = train_step(views, s, args)  # (1 + H,): the total, then one per head
        loop.end_step(losses, lr)
    loop.save()
    # Downstream uses the query encoder and decoder, as DenseCL's conversion script.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "decon-densecl" if args.decoder != "none" else "densecl", args.arch,
                               net_q.encoder, net_q.decoder, net_q.decoder_config(args), extra={"framework": "densecl"})
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return net_q, net_k, global_queue, dense_queues


if __name__ == "__main__":
    main()
