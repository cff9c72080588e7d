r"""DenseCL: dense contrastive learning, MoCo v2 plus a pixel-level InfoNCE between matched locations.

Paper: Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", CVPR 2021, https://arxiv.org/abs/2011.09157. Official code:
https://github.com/WXinlong/DenseCL.

Method. MoCo v2 with a second, dense projection head on the C5 map. For every location of the
query view, the matching location of the key view is the one whose *backbone* feature is most
similar (argmax cosine over the S x S grid); the query's dense embedding must pick that key's dense
embedding out of a second queue of negatives (queue2). Loss = (1 - lambda)·L_global + lambda·L_dense,
lambda = 0.5, both InfoNCE at T = 0.2 (Eq. 2-4). Everything is batched: one einsum for all
similarities, one gather for all matches.
- queue2 is a queue of its own because its keys live in another embedding space: the dense head's,
  not the global MLP's. It holds one key per earlier image, the key view's dense grid
  average-pooled and normalised: a negative must come from *another* image (pixels of one image are
  too alike), and 49 keys per image would flush the queue 49 times faster.
- Shuffle BN (as MoCo): BatchNorm statistics are computed over a batch, so a key's features carry
  a trace of its batch-mates, and a query could find its positive by that trace. The key images are
  shuffled across processes before the key encoder and put back after, so a key rarely shares its
  BatchNorm batch with its query (with 8 GPUs, 1 time in 8: the shuffle is a random permutation).

Shapes per GPU in the paper's run (8 GPUs x 32 images, 224 px, ResNet-50):

    im_q, im_k                   (32, 3, 224, 224)    the two views
    q_out.c5, k_out.c5           (32, 2048, 49)       C5 (32, 2048, 7, 7) flattened: S² = 49 locations
    q_out.global_, k_out.global_ (32, 128)            global embeddings, MoCo v2's MLP head
    q_out.grid, k_out.grid       (32, 128, 49)        dense embeddings (1x1-conv head)
    k_out.pooled                 (32, 128)            the key grid averaged over space: what queue2 holds
    similarity                   (32, 49, 49)         cosine of every query location with every key location
    match                        (32, 49)             the key location matched to each query location
    q_flat, k_flat               (1568, 128)          B·S² dense queries and their matched keys
    queue, queue2                (128, 65536) each    global keys / pooled dense keys of earlier images
    dense logits                 (1568, 1 + 65536)    never stored: QueueInfoNCE streams the queue

Launch:
    python densecl.py                                         # ImageNet recipe, synthetic data
    python densecl.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 \
        --synthetic-len 2048 --queue-size 4096                # CPU demo, a few minutes
    python densecl.py --data /path/to/images                  # your images, ImageNet recipe
    torchrun --nproc_per_node=8 densecl.py --data imagenet    # 200 epochs, lr 0.03 x N/256
    torchrun --nproc_per_node=8 densecl.py --data coco        # 800 epochs, lr 0.3 x N/256

Expected behaviour: both losses rise for the first few hundred steps while the queues fill with
real keys, then fall.

Reference results (DenseCL README, not reproduced here): COCO 800 ep -> VOC det AP 56.7, VOC seg
mIoU 67.5 (MoCo v2 in the same setting: 54.7 / 64.5); ImageNet 200 ep -> VOC det AP 58.7, VOC seg
69.4. Measured here: the miniature reproduction (docs/miniature.md, `python benchmarks/bench.py quality`).

Deviations from the official code:
- One process: shuffle BN emulated as moco.py does (--bn-splits groups of the batch, each with its
  own BatchNorm statistics, the key batch shuffled across them; default 8 = the paper's 8 GPUs);
  the official model shuffles through torch.distributed, so it runs under DDP only. --bn-splits 1:
  one BatchNorm over the batch.
- Queues are written with modular indices, so the global batch need not divide the queue size (it
  must not exceed it).
- bf16 autocast by default on CUDA (the official code trains in fp32); --amp fp32 restores it. The
  matching and the losses run in fp32 outside autocast.
- --data coco / coco+ select the COCO recipe (lr 0.3 x N/256, 800 epochs) unless --lr / --epochs
  are given; every other --data uses the ImageNet recipe (lr 0.03 x N/256, 200 epochs).
- --gpu-augment (off by default): the same augmentation distribution computed on the device
  (common.py, section 7), not the same pixels.
- Blur: torchvision's Gaussian blur with a kernel of 10% of the crop (at least 13 taps; 23 at
  224 px; common.blur_kernel), sigma U(0.1, 2); OpenSelfSup's GaussianBlur is PIL's
  ImageFilter.GaussianBlur(radius=sigma), which has no kernel size (PIL approximates the Gaussian
  with box passes). The same blur up to the kernel's truncation and PIL's approximation.

Checked against the official code (openselfsup/models/densecl.py, necks.py DenseCLNeck, the
configs): the backbone has OpenSelfSup's ResNet init (kaiming normal, fan_in); the neck's Linears
kaiming fan_in with zero bias, its 1x1 convs PyTorch's default init; matching on the normalised
backbone features; queue2 filled with the pooled, normalised dense keys; the lr a cosine stepped
per epoch (OpenSelfSup's CosineAnnealing, by epoch, to 0); --dense-warmup-iters (lambda = 0 for
the first iterations) off, as in the released configs.
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
    p = argparse.ArgumentParser(description="DenseCL pre-training", formatter_class=common.HelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=common.RESNET_ARCHS, help="backbone (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop side (paper: 224)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension of both heads (paper: 128)")
    p.add_argument("--queue-size", type=int, default=65536, help="length K of each queue (paper: 65536)")
    p.add_argument("--momentum", type=float, default=0.999, help="key encoder EMA momentum m (paper: 0.999)")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature of both losses (paper: 0.2)")
    p.add_argument("--loss-lambda", type=float, default=0.5, help="weight of the dense loss, lambda (paper: 0.5)")
    p.add_argument("--dense-warmup-iters", type=int, default=0,
                   help="iterations with lambda = 0 at the start (off in the released configs)")
    common.add_bn_splits_arg(p)
    p.add_argument("--lr", type=float, default=None,
                   help="absolute SGD lr; unset: 0.03 x batch/256 (ImageNet recipe), 0.3 x batch/256 on COCO")
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum (DenseCL's configs: 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(paper: 1e-4)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/densecl on the synthetic scenes, "
                        "runs/densecl-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=None, batch_size=256, epochs_help="training epochs (default: 800 on COCO, 200 otherwise)")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("densecl", args.data)
    common.check_args(p, args, positive=("lr", "queue_size", "dim", "temperature", "bn_splits"),
                      non_negative=("weight_decay", "loss_lambda", "dense_warmup_iters"))
    common.check_image_size(p, args, dense=True)
    # Derived values, computed once. COCO has 1/10 of ImageNet's images: the paper trains it 4x
    # longer with a 10x learning rate.
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
    """Two independent MoCo v2 "aug-plus" views of every image (DenseCL uses MoCo v2's pipeline). Returns the loader and, with --gpu-augment, the device-side
    augmentation (common.py, section 7) its decoded batches go through."""
    if args.gpu_augment:
        dataset = common.build_pretrain_dataset(args, common.DecodeOnly(args.max_side))
        return (common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device, common.pad_collate),
                common.MoCoV2Views(args.image_size))
    augment = common.moco_v2_augmentation(args.image_size)
    dataset = common.build_pretrain_dataset(args, common.TwoViews(augment))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device), None


# =================================================================================================
# Model
# =================================================================================================
class Outputs(NamedTuple):
    """An encoder's four outputs, none normalised yet."""
    c5: torch.Tensor  # (B, C, S²) the backbone's map, flattened: what the matching compares
    global_: torch.Tensor  # (B, D) the global MLP head's embedding (MoCo v2's)
    grid: torch.Tensor  # (B, D, S²) the dense head's embedding of every location
    pooled: torch.Tensor  # (B, D) the grid averaged over space: what queue2 holds


class Encoder(nn.Module):
    """ResNet trunk + DenseCL neck: a global MLP head and a dense 1x1-conv head on C5, no BN.
    forward(x) returns its Outputs."""

    def __init__(self, arch, dim):
        super().__init__()
        self.backbone = common.ResNetTrunk(arch, conv_init="fan_in")  # OpenSelfSup's ResNet init, as DenseCL
        c = self.backbone.out_channels
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim))
        self.dense_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, dim, 1))
        for m in self.head:  # the official neck inits its Linears (kaiming fan_in); its convs keep PyTorch's default
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W)
        c5 = self.backbone(x)  # (B, C, h, w)
        grid = self.dense_head(c5).flatten(2)  # (B, D, S²)
        return Outputs(c5.flatten(2), self.head(c5.mean((2, 3))), grid, grid.mean(2))


class Queue(nn.Module):
    """FIFO of L2-normalised keys, stored (D, K) as in the paper, with a write pointer."""

    def __init__(self, dim, size):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(dim, size), dim=0))  # (D, K), random unit keys
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, k):
        """Overwrite the oldest N columns with k (N, D); no host sync (the pointer stays on device)."""
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % self.keys.shape[1]  # (N,)
        self.keys.index_copy_(1, idx, k.T.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + k.shape[0]) % self.keys.shape[1])


@torch.no_grad()
def momentum_update(key_params, query_params, m):
    """key <- m * key + (1 - m) * query, one fused foreach kernel per call."""
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle BN, step 1: gather the key images of all ranks, permute them with a permutation made
    on rank 0, and return this rank's slice plus the indices that undo the permutation."""
    B, W = x.shape[0], common.world_size()
    x_all = common.concat_all_gather(x)  # (N, 3, H, W), N = W * B
    perm = torch.randperm(x_all.shape[0], device=x.device)  # (N,)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)  # (N,): position of each original sample in the shuffled order
    return x_all[perm.view(W, B)[dist.get_rank()]], unshuffle.view(W, B)[dist.get_rank()]


@torch.no_grad()
def batch_unshuffle(k, unshuffle):
    """Shuffle BN, step 2: gather the outputs of all ranks and pick this rank's samples back."""
    return common.concat_all_gather(k)[unshuffle]  # (N, ...) -> (B, ...)


# =================================================================================================
# Loss
# =================================================================================================
@common.fp32
def infonce(q, k, queue, temperature):
    """MoCo's InfoNCE, batched; DenseCL uses it for both the global and the dense loss.

    q:     (M, D) L2-normalised queries (M = B images, or B·S² locations for the dense loss).
    k:     (M, D) L2-normalised positive keys.
    queue: (D, K) L2-normalised negative keys.
    """
    l_pos = torch.einsum("md,md->m", q, k).unsqueeze(1)  # (M, 1)
    l_neg = torch.einsum("md,dk->mk", q, queue)  # (M, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (M, 1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


@common.fp32
def match_locations(q_feat, k_feat):
    """For each query location, the key location with the most similar backbone feature.

    q_feat, k_feat: (B, C, S²) L2-normalised backbone (C5) features of the two views. Matching
    uses the backbone, not the projected grid: its features change slowly and are not shaped by
    the dense loss they supervise (paper Sec. 3.3). Returns (B, S²) indices into the key grid.
    """
    similarity = torch.einsum("bcq,bck->bqk", q_feat, k_feat)  # (B, S², S²)
    return similarity.argmax(dim=2)  # (B, S²)


@common.fp32
def dense_loss(q_grid, k_grid, match, queue, temperature):
    """DenseCL's dense InfoNCE (Eq. 2-3).

    q_grid: (B, D, S²) L2-normalised dense query embeddings.
    k_grid: (B, D, S²) L2-normalised dense key embeddings.
    match:  (B, S²) key location matched to each query location.
    queue:  (D, K) negatives: average-pooled, normalised dense keys of earlier images.
    Equal to infonce(q_flat, k_flat, queue, T), computed by QueueInfoNCE (below) without the logits.
    """
    B, D, S2 = q_grid.shape
    k_matched = torch.gather(k_grid, 2, match.unsqueeze(1).expand(B, D, S2))  # (B, D, S²)
    q_flat = q_grid.transpose(1, 2).reshape(B * S2, D)  # (B·S², D)
    k_flat = k_matched.transpose(1, 2).reshape(B * S2, D)  # (B·S², D)
    return QueueInfoNCE.apply(q_flat, k_flat, queue, temperature)


# ---- Speed only: QueueInfoNCE is infonce(q, k, queue, T) with the same value and the same gradient with
# ---- respect to q (tests/test_densecl.py), computed without storing the (B·S², 1 + K) logits. Read infonce above.
class QueueInfoNCE(torch.autograd.Function):
    """infonce(q, k, queue, T) with the same value and the same gradient with respect to q, without
    storing the (M, K) logits. k and the queue get no gradient: in DenseCL both come from the key
    encoder, which gradients never train (a k that requires grad is refused).

    The dense loss has M = B·S² queries (1568 x 65536 logits at the paper's B = 32): writing that matrix and running
    a softmax over it costs more than the matmul itself (benchmarks/bench.py loss). Here the queue is
    read in chunks that stay in cache, and the softmax's sums are accumulated on the way, shifted by
    each row's running maximum (rescaled when a chunk raises it), so that no exp over- or underflows
    at any temperature: at a low T, logits all near -1/T would underflow a fixed shift.
    Gradient of the mean loss: d/dq = (sum_j p_j x_j - k) / (T·M), p = softmax over [k, queue].
    """

    @staticmethod
    def forward(ctx, q, k, queue, temperature, chunk=4096):
        if k.requires_grad or queue.requires_grad:
            raise ValueError("QueueInfoNCE gives a gradient for q only: its keys and queue must not require grad")
        with torch.autocast(q.device.type, enabled=False):
            qs, k, queue = q.float() / temperature, k.float(), queue.float()  # (M, D), (M, D), (D, K)
            l_pos = (qs * k).sum(1)  # (M,) the positive's logit
            top = l_pos.clone()  # (M,) running maximum of each row's logits
            z = torch.ones_like(l_pos)  # (M,) sum_j exp(l_j - top): the positive's term is exp(0)
            u = k.clone()  # (M, D) sum_j exp(l_j - top) x_j
            grad = ctx.needs_input_grad[0]  # without it (evaluation, bench.py loss) u is not needed
            for c in range(0, queue.shape[1], chunk):  # chunks of the queue, not of images or locations
                keys = queue[:, c:c + chunk]  # (D, chunk)
                logits = qs @ keys  # (M, chunk)
                new_top = torch.maximum(top, logits.amax(1))  # (M,)
                rescale = torch.exp(top - new_top)  # (M,) <= 1: the sums so far, to the new shift
                e = logits.sub_(new_top[:, None]).exp_()  # (M, chunk)
                z = z * rescale + e.sum(1)
                if grad:
                    u = torch.addmm(u * rescale[:, None], e, keys.T)
                top = new_top
            if grad:
                ctx.save_for_backward(((u / z[:, None] - k) / (temperature * q.shape[0])).to(q.dtype))
            return (torch.log(z) + top - l_pos).mean()

    @staticmethod
    def backward(ctx, grad):
        (grad_q,) = ctx.saved_tensors
        return grad * grad_q, None, None, None, None


# =================================================================================================
# Train step
# =================================================================================================
def schedule(args, steps_per_epoch):
    """The lr of every step, as the official config (mmcv's CosineAnnealing by epoch, min_lr 0):
    lr·(1 + cos(pi·e/E))/2 for epoch e of E, held over the epoch; no warm-up."""
    return common.cosine_schedule(args.lr, 0.0, args.epochs, steps_per_epoch, per_step=False)


class State(NamedTuple):
    """What a DenseCL step reads and updates, besides its views."""
    encoder_q: nn.Module  # the query encoder as trained (DDP / torch.compile wrap it; the parameters are its)
    encoder_k: nn.Module  # the key encoder: an EMA of the query encoder, never trained by gradients
    queue: "Queue"  # global keys of earlier batches
    queue2: "Queue"  # dense keys of earlier batches, one pooled key per image
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(views, s, step, args):
    """One DenseCL iteration: EMA update, the query view through the query encoder and the key view
    through the key encoder, the matching, the global and dense InfoNCE, an optimizer step, both
    queues pushed. Returns (total, global, dense) loss tensors (no host sync)."""
    # The dense loss is off for the first --dense-warmup-iters steps (the official loss_lambda warm-up).
    loss_lambda = 0.0 if step < args.dense_warmup_iters else args.loss_lambda
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    im_q, im_k = (v.to(s.device, non_blocking=True, memory_format=memory_format) for v in views)  # (B, 3, H, W)
    with common.autocast(s.device, s.dtype):  # the networks in mixed precision; matching and losses below in fp32
        q_out = s.encoder_q(im_q)
        with torch.no_grad():
            momentum_update(list(s.encoder_k.parameters()), list(s.encoder_q.parameters()), args.momentum)
            if common.world_size() > 1:
                im_k, unshuffle = batch_shuffle(im_k)
                k_out = Outputs(*(batch_unshuffle(t.float(), unshuffle) for t in s.encoder_k(im_k)))
            elif args.bn_splits > 1:  # shuffle BN emulated: the key of image n lands in a random BatchNorm group
                perm = torch.randperm(im_k.shape[0], device=s.device)  # (B,)
                k_out = Outputs(*(t[torch.argsort(perm)] for t in s.encoder_k(im_k[perm])))
            else:
                k_out = s.encoder_k(im_k)
    q_out, k_out = (Outputs(*(F.normalize(t.float(), dim=1) for t in out)) for out in (q_out, k_out))
    with torch.no_grad():
        match = match_locations(q_out.c5, k_out.c5)  # (B, S²): by backbone features
    loss_global = infonce(q_out.global_, k_out.global_, s.queue.keys, args.temperature)
    loss_dense = dense_loss(q_out.grid, k_out.grid, match, s.queue2.keys, args.temperature)
    loss = (1 - loss_lambda) * loss_global + loss_lambda * loss_dense
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.queue.push(common.concat_all_gather(k_out.global_))  # after backward: the loss graph has read the old queues
    s.queue2.push(common.concat_all_gather(k_out.pooled))  # one pooled dense key per image: negatives from other images
    return torch.stack([loss, loss_global, loss_dense]).detach()


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
    common.print0(f"DenseCL | {args.arch} {args.image_size}px | {world} process(es) x {args.batch_per_rank} images | "
                  f"lr {args.lr:g} | {args.epochs} epochs x {steps_per_epoch} steps = {args.epochs * steps_per_epoch} | "
                  f"lambda {args.loss_lambda} | {common.precision_name(dtype)} | device {device} | output {out}")

    encoder_q = Encoder(args.arch, args.dim)
    if world == 1:  # per-group BatchNorm statistics, as the official code's per-GPU ones
        common.split_batchnorm(encoder_q, args.bn_splits)
    encoder_q = encoder_q.to(device)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # a copy after the split: its BatchNorms are split too
    queue, queue2 = Queue(args.dim, args.queue_size).to(device), Queue(args.dim, args.queue_size).to(device)
    if device.type == "cuda":
        encoder_q.to(memory_format=torch.channels_last)
        encoder_k.to(memory_format=torch.channels_last)
    # Every rank starts from the same weights and queues (seeded above); from here on each rank draws
    # its own random numbers (augmentations, shuffles), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=args.lr, momentum=args.sgd_momentum,
                                weight_decay=args.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue, "queue2": queue2},
                       optimizer, scaler, args, log, steps_per_epoch, device,
                       loss_names=("loss", "loss_global", "loss_dense"))  # resumes here if a checkpoint exists
    model_q = nn.parallel.DistributedDataParallel(encoder_q) if world > 1 else encoder_q
    s = State(torch.compile(model_q) if args.compile else model_q, encoder_k, queue, queue2, optimizer, scaler, dtype,
              device)

    for epoch, views in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> two augmented views, on the device
            views = device_views(views, device)
        lr = lr_schedule[loop.step]
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = train_step(views, s, loop.step, args)  # (total, global, dense)
        loop.end_step(losses, lr)
    loop.save()
    # Downstream uses the query encoder's backbone, as the official DenseCL conversion script.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "densecl", args.arch, encoder_q.backbone)
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return encoder_q, encoder_k, queue, queue2


if __name__ == "__main__":
    main()
