r"""MoCo v2: momentum contrast with an MLP head and stronger augmentation, the baseline.

Paper: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning", 2020,
https://arxiv.org/abs/2003.04297 (MoCo: He et al., CVPR 2020, https://arxiv.org/abs/1911.05722).
Official code: https://github.com/facebookresearch/moco

Method. A query encoder (ResNet + 2-layer MLP head) embeds one augmented view; a key encoder, an
exponential moving average of the query encoder, embeds another view of the same image. The query
must pick its own key out of a queue of 65536 keys from earlier batches (InfoNCE, T = 0.2). The
queue decouples the number of negatives from the batch size; the slowly moving key encoder keeps
the queued keys consistent. Shuffle BN: BatchNorm statistics are computed over a batch, so a key's
features carry a trace of its batch-mates, a shortcut to its query; the key images are shuffled
across processes before the key encoder, so a key rarely shares its BatchNorm batch with its query
(with 8 GPUs, 1 time in 8: the shuffle is a random permutation).

Shapes per GPU in the paper's run (8 GPUs x 32 images, 224 px, ResNet-50):

    im_q, im_k    (32, 3, 224, 224)    the two views
    q, k          (32, 128)            L2-normalised embeddings
    queue         (128, 65536)         keys of earlier batches, all ranks
    logits        (32, 1 + 65536)      [q·k | q·queue] / T, the positive in column 0

Launch:
    python moco.py                                        # paper recipe, synthetic data, 1 process
    python moco.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 \
        --synthetic-len 2048 --queue-size 4096            # CPU demo, a few minutes
    python moco.py --data /path/to/images                 # your images
    torchrun --nproc_per_node=8 moco.py --data imagenet   # the paper's 200-epoch ImageNet run
    torchrun --nproc_per_node=8 moco.py --data coco --epochs 800 --lr 0.3   # DenseCL's COCO baseline

Reference results (paper / DenseCL README, not reproduced here): ResNet-50, ImageNet 200 ep,
linear top-1 67.5; VOC07+12 Faster R-CNN C4 AP50/AP/AP75 82.4/57.0/63.6. COCO 800 ep
pre-training: VOC det AP 54.7, VOC seg mIoU 64.5. Measured here: the miniature reproduction
(docs/miniature.md, `python benchmarks/bench.py quality`).

Deviations from the official code:
- One process: shuffle BN is emulated as in the official repository's Colab demo
  (colab/moco_cifar10_demo.ipynb, branch colab-notebook; its main_moco.py runs under DDP only):
  every BatchNorm normalises --bn-splits groups of the batch apart (default 8, the paper's 8 GPUs:
  a one-process batch of 256 then has the paper's per-GPU statistics of 32 images), and the key
  batch is shuffled before the key encoder. --bn-splits 1: one BatchNorm over the whole batch.
- The queue is written with modular indices, so the global batch need not divide the queue size
  (the official code asserts it does; it must not exceed it); with a dividing batch the queue is
  the same FIFO.
- bf16 autocast by default on CUDA (the official code trains in fp32); --amp fp32 restores it. The
  loss runs in fp32 outside autocast.
- --gpu-augment (off by default): the same augmentation distribution computed on the device
  (common.py, section 7), not the same pixels.

Checked against the official code (main_moco.py, moco/builder.py): torchvision's ResNet init; the
MLP head without BN; the key encoder updated before the keys are computed; the queue's random unit
init; the lr cosine stepped per epoch.
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
    p = argparse.ArgumentParser(description="MoCo v2 pre-training", formatter_class=common.HelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=common.RESNET_ARCHS, help="backbone (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop side (paper: 224)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension (paper: 128)")
    p.add_argument("--queue-size", type=int, default=65536, help="negative keys in the queue, K (paper: 65536)")
    p.add_argument("--momentum", type=float, default=0.999, help="key encoder EMA momentum m (paper: 0.999)")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature T (MoCo v2: 0.2)")
    common.add_bn_splits_arg(p)
    p.add_argument("--lr", type=float, default=None,
                   help="absolute SGD learning rate; unset: 0.03 x batch/256 (the paper's 0.03 at 256, linear scaling)")
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(paper: 1e-4)")
    p.add_argument("--output-dir", default=None,
                   help="checkpoint, log, args; a rerun resumes from here (default: runs/moco on the synthetic scenes, "
                        "runs/moco-<preset or folder name> on other data)")
    common.add_data_args(p)
    common.add_run_args(p, epochs=200, batch_size=256)
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or common.default_output_dir("moco", args.data)
    common.check_args(p, args, positive=("lr", "queue_size", "dim", "temperature", "bn_splits"),
                      non_negative=("weight_decay",))
    common.check_image_size(p, args, dense=False)
    # Derived values, computed once.
    common.split_batch(p, args)
    common.check_bn_splits(p, args)
    if args.queue_size < args.batch_size:
        p.error(f"--queue-size {args.queue_size} is smaller than the global batch {args.batch_size}: one push would "
                f"write some queue slots twice (nondeterministic on CUDA); use a queue of at least one global batch")
    args.lr = args.lr if args.lr is not None else 0.03 * args.batch_size / 256  # linear scaling rule
    return args


# =================================================================================================
# Data
# =================================================================================================
def build_data(args, device):
    """Two independent MoCo v2 "aug-plus" views of every image. Returns the loader and, with --gpu-augment, the device-side
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
class Encoder(nn.Module):
    """ResNet trunk + MoCo v2 MLP head: C5 -> avgpool -> Linear(C, C) -> ReLU -> Linear(C, dim)."""

    def __init__(self, arch, dim):
        super().__init__()
        self.backbone = common.ResNetTrunk(arch)
        c = self.backbone.out_channels
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim))

    def forward(self, x):  # (B, 3, H, W) -> (B, dim)
        return self.head(self.backbone(x).mean((2, 3)))


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
    return common.concat_all_gather(k)[unshuffle]  # (N, D) -> (B, D)


# =================================================================================================
# Loss
# =================================================================================================
@common.fp32
def infonce(q, k, queue, temperature):
    """MoCo's InfoNCE (Eq. 1), batched.

    q:     (N, D) L2-normalised queries.
    k:     (N, D) L2-normalised positive keys, k[i] from the other view of image i.
    queue: (D, K) L2-normalised negative keys.
    Returns the mean cross-entropy of picking index 0 (the positive) among 1 + K logits.
    """
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(1)  # (N, 1)
    l_neg = torch.einsum("nd,dk->nk", q, queue)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


# =================================================================================================
# Train step
# =================================================================================================
def schedule(args, steps_per_epoch):
    """The lr of every step, as main_moco.py's adjust_learning_rate with --cos: lr·(1 + cos(pi·e/E))/2
    for epoch e of E, held over the epoch; no warm-up."""
    return common.cosine_schedule(args.lr, 0.0, args.epochs, steps_per_epoch, per_step=False)


class State(NamedTuple):
    """What a MoCo step reads and updates, besides its views."""
    encoder_q: nn.Module  # the query encoder as trained (DDP / torch.compile wrap it; the parameters are its)
    encoder_k: nn.Module  # the key encoder: an EMA of the query encoder, never trained by gradients
    queue: "Queue"  # the keys of earlier batches
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only
    dtype: torch.dtype  # autocast dtype, None for fp32
    device: torch.device


def train_step(views, s, args):
    """One MoCo v2 iteration: EMA update of the key encoder, the two views through both encoders,
    InfoNCE against the queue, an optimizer step, the keys pushed. Returns the loss (no host sync)."""
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    im_q, im_k = (v.to(s.device, non_blocking=True, memory_format=memory_format) for v in views)  # (B, 3, H, W)
    with common.autocast(s.device, s.dtype):  # the networks in mixed precision, the loss below in fp32
        q = s.encoder_q(im_q)  # (B, D)
        with torch.no_grad():
            momentum_update(list(s.encoder_k.parameters()), list(s.encoder_q.parameters()), args.momentum)
            if common.world_size() > 1:
                im_k, unshuffle = batch_shuffle(im_k)
                k = batch_unshuffle(s.encoder_k(im_k).float(), unshuffle)  # (B, D)
            elif args.bn_splits > 1:  # shuffle BN emulated: the key of image n lands in a random BatchNorm group
                perm = torch.randperm(im_k.shape[0], device=s.device)  # (B,)
                k = s.encoder_k(im_k[perm])[torch.argsort(perm)]  # (B, D)
            else:
                k = s.encoder_k(im_k)
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    loss = infonce(q, k, s.queue.keys, args.temperature)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.queue.push(common.concat_all_gather(k))  # after backward: the loss graph has read the old queue
    return loss.detach()


# =================================================================================================
# Main
# =================================================================================================
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)  # the same initial weights and queue on every rank
    out = common.prepare_output(args, __file__)
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)

    loader, device_views = build_data(args, device)
    steps_per_epoch = len(loader)
    lr_schedule = schedule(args, steps_per_epoch)
    common.print0(f"MoCo v2 | {args.arch} {args.image_size}px | {world} process(es) x {args.batch_per_rank} images | "
                  f"lr {args.lr:g} | {steps_per_epoch} steps/epoch, {args.epochs * steps_per_epoch} in all | "
                  f"{common.precision_name(dtype)} | device {device} | output {out}")

    encoder_q = Encoder(args.arch, args.dim)
    if world == 1:  # per-group BatchNorm statistics, as the official code's per-GPU ones
        common.split_batchnorm(encoder_q, args.bn_splits)
    encoder_q = encoder_q.to(device)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # a copy after the split: its BatchNorms are split too
    queue = Queue(args.dim, args.queue_size).to(device)
    if device.type == "cuda":
        encoder_q.to(memory_format=torch.channels_last)
        encoder_k.to(memory_format=torch.channels_last)
    # Every rank starts from the same weights and queue (seeded above); from here on each rank draws
    # its own random numbers (augmentations, shuffles), or all ranks would see the same crops.
    common.seed_everything(args.seed + rank)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=args.lr, momentum=args.sgd_momentum,
                                weight_decay=args.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loop = common.Loop(out, {"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue}, optimizer, scaler,
                       args, log, steps_per_epoch, device)  # resumes here if a checkpoint exists
    model_q = nn.parallel.DistributedDataParallel(encoder_q) if world > 1 else encoder_q
    s = State(torch.compile(model_q) if args.compile else model_q, encoder_k, queue, optimizer, scaler, dtype, device)

    for epoch, views in loop.batches(loader):
        if device_views is not None:  # --gpu-augment: decoded images -> two augmented views, on the device
            views = device_views(views, device)
        lr = lr_schedule[loop.step]
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss = train_step(views, s, args)
        loop.end_step(loss, lr)
    loop.save()
    # Downstream uses the query encoder's backbone, as the official MoCo/DenseCL conversion scripts.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "moco", args.arch, encoder_q.backbone)
    common.print0(f"done: step {loop.step}/{loop.last_step}; checkpoint {loop.path}; downstream weights "
                  f"{out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return encoder_q, encoder_k, queue


if __name__ == "__main__":
    main()
