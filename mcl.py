"""MCL: multi-level contrastive learning with a montage pretext, for dense prediction.

Paper: Guo, Zhang, Li, Shao, Luo, "Multi-Level Contrastive Learning for Dense Prediction Task",
2023, https://arxiv.org/abs/2304.02010. Official code: https://github.com/GuoQiushan/MCL
(openselfsup/models/mcl.py, configs/selfsup/MCL/MCL.py).

Method. Every image is cropped 8 times (4 crops per branch, BYOL's asymmetric augmentations). In
each branch, crop l is shrunk by a ratio r in {1, 2, 4, 8} and pasted as a tile into r x r grid
"montages" of the full input size, tiles assigned to grid cells by a random permutation. A tile of
ratio r then covers exactly one 7 x 7 window of the FPN level whose stride matches its scale (r = 1:
P5, 2: P4, 4: P3, 8: P2). A region head (4 convs, pooling, MLP) embeds every window; a per-level
predictor maps it to the embedding space of the EMA target network's full-image embedding (level
0, P5) of the *other* branch, and an InfoNCE over the global batch asks each tile to identify its
source image (T = 1.0, scaled by 2T, level weights 1/2, 1/4, 1/8, 1/8, symmetrised). The montage
teaches scale-aware, position-aware features at every pyramid level, which transfer to detectors.

Montage rule. Per-rank batch B; montages per level [B, B/4, B/16, B/32] (the official
[128, 32, 8, 4] at B = 128), so levels 1-4 hold B tiles and level 8 holds 2B: every image appears
once per level, twice at ratio 8. Slot s of a level shows image perm[s] mod B. B must be a multiple
of 32 (the r = 8 level needs a whole number of montages); anything else is refused with an error.

Launch:
    python mcl.py                                                    # ImageNet recipe, synthetic data
    python mcl.py --arch resnet18 --image-size 64 --batch-size 32 --epochs 5 --synthetic-len 2048 --lr 0.5   # CPU demo
    python mcl.py ... --save-montage montage.png                     # draw one montage per level and exit
    torchrun --nproc_per_node=8 mcl.py --data imagenet --batch-size 4096

Reference results (abstract; not reproduced here): Mask R-CNN R50-FPN 1x on COCO 42.5 AP box /
38.3 AP mask after 100 ImageNet epochs, +4.0 / +3.1 over MoCo.

Measured here (synthetic miniature, not the paper's protocol; README, `python bench.py quality
--seeds 0 1`): probe mIoU 6.76 ± 0.09 against 6.58 ± 0.02 for random init.

Deviations from the official code:
- The region head runs only on the windows that exist: each level's montages are read at their own
  FPN level (the official code runs the head on every level of every montage and slices). Each
  window is convolved on its own (zero padding at window borders).
- The online encoder sees all montages of both branches as one batch (one BN batch), as the
  official code; the target network sees only the two full-image crops it needs.
- The symmetrised loss is the sum of both branch directions.
- SyncBN under DDP on CUDA only; bf16 autocast by default on CUDA (the official uses fp16; --amp fp16).
"""
import argparse
import copy
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

RATIOS = (1, 2, 4, 8)


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MCL pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="resnet18 | resnet50 (paper: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="crop and montage side; a multiple of 32 (paper: 224)")
    p.add_argument("--temperature", type=float, default=1.0, help="InfoNCE temperature T (MCL: 1.0)")
    p.add_argument("--level-weights", type=float, nargs=4, default=(0.5, 0.25, 0.125, 0.125), help="per ratio 1, 2, 4, 8")
    p.add_argument("--base-momentum", type=float, default=0.99, help="EMA momentum, cosine to 1 (MCL: 0.99)")
    p.add_argument("--lr", type=float, default=1.0, help="LARS lr per 256 images (MCL: 1.0)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="end of the cosine (MCL: 1e-4)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="(MCL: 3127 iterations = 10 epochs at 4096)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="(MCL: 1e-5, not on BN and biases)")
    p.add_argument("--clip-grad", type=float, default=500.0, help="global gradient norm clip (MCL: 500)")
    p.add_argument("--save-montage", default=None, help="write a PNG of one montage per level for the first batch, then exit")
    p.add_argument("--output-dir", default="runs/mcl", help="checkpoint, log, args; a rerun resumes from here")
    common.add_data_args(p)
    common.add_run_args(p, epochs=100, batch_size=4096)
    args = p.parse_args(argv)
    common.split_batch(p, args)
    if args.batch_per_rank % 32:
        p.error(f"the per-process batch ({args.batch_per_rank}) must be a multiple of 32: the ratio-8 level pastes "
                f"64 tiles per montage and holds 2B tiles, i.e. B/32 montages (e.g. --batch-size 32, 64, 128 per process)")
    if args.image_size % 32:
        p.error(f"--image-size {args.image_size} must be a multiple of 32 (a ratio-8 tile covers one window of P2)")
    args.montages = [args.batch_per_rank // min(r * r, 32) for r in RATIOS]  # [B, B/4, B/16, B/32]
    args.scaled_lr = args.lr * args.batch_size / 256
    return args


# =================================================================================================
# Model
# =================================================================================================
class RegionHead(nn.Module):
    """MCL's region head, shared by all levels: 4 x (3x3 conv, BN, ReLU) on a window, average pool,
    MLP 256 -> 2048 (BN, ReLU) -> 256, then BN without affine. (S, C, w, w) -> (S, 256)."""

    def __init__(self, channels=256, hidden=2048, out=256):
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))])
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.last_bn = nn.BatchNorm1d(out, affine=False)

    def forward(self, windows):
        return self.last_bn(self.mlp(self.convs(windows).mean((2, 3))))


class Online(nn.Module):
    """ResNet + FPN (P2-P5) + region head. forward(canvases, plan) embeds every window of every
    montage, reading each group of montages at the FPN level of its ratio."""

    def __init__(self, arch):
        super().__init__()
        self.encoder = common.ResNetTrunk(arch, pyramid=True)
        self.fpn = common.FPN(self.encoder.channels, 256)
        self.head = RegionHead()

    def forward(self, canvases, plan):
        """canvases: (sum of counts, 3, H, W); plan: [(ratio, count)] in the order of the canvases.
        Returns one (count·r², 256) tensor per plan entry, in slot order."""
        pyramid = self.fpn(self.encoder(canvases))  # [P2, P3, P4, P5]
        windows, start = [], 0
        for r, count in plan:
            level = pyramid[3 - int(np.log2(r))]  # r = 1: P5, 2: P4, 4: P3, 8: P2
            windows.append(montage_windows(level[start:start + count], r))
            start += count
        sizes = [w.shape[0] for w in windows]
        return list(self.head(torch.cat(windows)).split(sizes))  # one head call for all windows


class Student(nn.Module):
    """The online network plus one predictor per level (Linear-BN-ReLU-Linear), in one module so
    that DDP sees a single forward. Returns normalised predictions per plan entry."""

    def __init__(self, arch):
        super().__init__()
        self.online = Online(arch)
        self.predictors = nn.ModuleList(nn.Sequential(nn.Linear(256, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                                                      nn.Linear(2048, 256)) for _ in RATIOS)

    def forward(self, canvases, plan):
        z = self.online(canvases, plan)
        return [F.normalize(self.predictors[RATIOS.index(r)](zi), dim=1) for (r, _), zi in zip(plan, z)]


@torch.no_grad()
def ema_update(target_params, online_params, m):
    """target <- m·target + (1 - m)·online, one fused foreach kernel."""
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)


# =================================================================================================
# Montage
# =================================================================================================
def make_montage(tiles, r, count, perm):
    """Paste tiles into `count` r x r montages. tiles: (B, 3, t, t); perm: (r²·count,) a permutation
    of the slots; slot s shows image perm[s] mod B. Returns canvases (count, 3, r·t, r·t) and the
    source image of every slot (r²·count,), slot s = canvas·r² + row·r + column."""
    B, C, t, _ = tiles.shape
    source = perm % B  # (S,)
    grid = tiles[source].view(count, r, r, C, t, t)  # (count, row, col, C, t, t)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(count, C, r * t, r * t), source


def montage_windows(feat, r):
    """Cut a feature map of `count` montages (count, C, r·w, r·w) into its r² windows per montage,
    (count·r², C, w, w), in slot order."""
    n, C, H, W = feat.shape
    w = H // r
    return feat.view(n, C, r, w, r, w).permute(0, 2, 4, 1, 3, 5).reshape(n * r * r, C, w, w)


def build_montages(branch_views, montages, device):
    """All montages of one branch: crop l is shrunk by RATIOS[l] and pasted at random.
    branch_views: 4 tensors (B, 3, H, W). Returns canvases, plan [(r, count)], source indices per level."""
    canvases, plan, sources = [], [], []
    for view, r, count in zip(branch_views, RATIOS, montages):
        tiles = view if r == 1 else F.interpolate(view, scale_factor=1 / r, mode="bilinear", antialias=True, align_corners=False)
        perm = torch.randperm(r * r * count, device=device)
        canvas, source = make_montage(tiles, r, count, perm)
        canvases.append(canvas)
        plan.append((r, count))
        sources.append(source)
    return torch.cat(canvases), plan, sources


# =================================================================================================
# Loss
# =================================================================================================
def level_loss(pred, targets, labels, temperature):
    """InfoNCE of each tile's prediction against all full-image targets of the global batch.

    pred: (S, D) normalised predictions of S tiles; targets: (N, D) normalised target embeddings
    of the other branch (all ranks); labels: (S,) global index of each tile's source image.
    Scaled by 2T as in the official head."""
    return F.cross_entropy(pred @ targets.T / temperature, labels) * 2 * temperature


def multi_level_loss(preds, sources, t_full, weights, temperature):
    """The symmetrised multi-level loss.

    preds:   8 tensors (S_l, D), normalised predictions of branch 1 levels 1-4 then branch 2 levels 1-4.
    sources: 8 tensors (S_l,), the local index of each tile's source image.
    t_full:  (2B, D) normalised target embeddings of this rank's full images, branch 1 then branch 2.
    weights: (4,) level weights on the device.
    Tiles of one branch are matched against the other branch's targets from all ranks; labels are
    global indices (local index + rank·B). Returns (weighted total, per-level losses (4,))."""
    B = t_full.shape[0] // 2
    rank = dist.get_rank() if dist.is_initialized() else 0
    targets = [common.concat_all_gather(t_full[B:]), common.concat_all_gather(t_full[:B])]  # (N, D) each
    per_level = torch.zeros(len(RATIOS), device=t_full.device)
    for i, (pred, src) in enumerate(zip(preds, sources)):  # 8 (branch, level) groups, not images or tiles
        branch, level = divmod(i, len(RATIOS))
        per_level[level] += level_loss(pred.float(), targets[branch], src + rank * B, temperature)
    return (per_level * weights).sum(), per_level


# =================================================================================================
# Data
# =================================================================================================
class EightCrops:
    """Four crops per branch, BYOL's asymmetric pipelines (crop scale 0.2-1)."""

    def __init__(self, size):
        self.t1, self.t2 = common.byol_augmentations(size, scale=(0.2, 1.0))

    def __call__(self, img):
        return [self.t1(img) for _ in range(4)] + [self.t2(img) for _ in range(4)]


def build_data(args, device):
    dataset = common.build_pretrain_dataset(args, EightCrops(args.image_size))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device)


def save_montage_png(views, args, path):
    """One montage per level of the first branch, side by side, de-normalised."""
    from PIL import Image
    canvases, plan, _ = build_montages(views[:4], args.montages, views[0].device)
    firsts, start = [], 0
    for r, count in plan:
        firsts.append(canvases[start])
        start += count
    x = torch.cat(firsts, 2) * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)


# =================================================================================================
# Train step
# =================================================================================================
def train_step(views, student, target, params_t, params_o, m, optimizer, scaler, level_weights, args, dtype, device):
    """One MCL iteration; returns (total, per-level) loss tensors (no host sync)."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    views = [v.to(device, non_blocking=True) for v in views]  # 8 x (B, 3, H, W)
    B = views[0].shape[0]
    c1, plan, src1 = build_montages(views[:4], args.montages, device)
    c2, _, src2 = build_montages(views[4:], args.montages, device)
    with common.autocast(device, dtype):
        preds = student(torch.cat([c1, c2]).contiguous(memory_format=memory_format), plan + plan)  # both branches, one batch
        with torch.no_grad():
            ema_update(params_t, params_o, m)
            full = torch.cat([views[0], views[4]]).contiguous(memory_format=memory_format)  # the ratio-1 crops
            t_full = F.normalize(target(full, [(1, 2 * B)])[0].float(), dim=1)  # (2B, D): level-0 embeddings
        loss, per_level = multi_level_loss(preds, src1 + src2, t_full, level_weights, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return torch.cat([loss.detach().view(1), per_level.detach()])


# =================================================================================================
# Main
# =================================================================================================
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out = common.prepare_output(args, __file__)
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)

    loader = build_data(args, device)
    if args.save_montage:
        common.seed_everything(args.seed)
        save_montage_png(next(iter(loader)), args, args.save_montage)
        common.print0(f"wrote {args.save_montage}: one montage per ratio {RATIOS}, counts per process {args.montages}")
        return None
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    lr_schedule = common.cosine_schedule(args.scaled_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    m_schedule = common.momentum_schedule(args.base_momentum, args.epochs, steps_per_epoch)
    common.print0(f"MCL | {args.arch} {args.image_size}px | montages per level {args.montages} | {world} x "
                  f"{args.batch_per_rank} images | lr {args.scaled_lr:g} | {args.epochs} epochs x {steps_per_epoch} steps | "
                  f"amp {dtype} | device {device} | output {out}")

    student = common.sync_batchnorm(Student(args.arch), True).to(device)
    target = copy.deepcopy(student.online).requires_grad_(False)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
        target.to(memory_format=torch.channels_last)
    params_o, params_t = list(student.online.parameters()), list(target.parameters())
    common.seed_everything(args.seed + rank)
    optimizer = common.LARS(common.lars_param_groups(student), lr=args.scaled_lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    ckpt_path = out / "checkpoint.pth"
    state = {"student": student, "target": target}  # online network + predictors, EMA target
    step, _ = common.resume(ckpt_path, state, optimizer, scaler, device)
    save = lambda: common.save_checkpoint(ckpt_path, state, optimizer, scaler, step, args)

    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    if args.compile:
        model = torch.compile(model)
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    level_weights = torch.tensor(args.level_weights, device=device)  # once, not a host-to-device copy per step
    running, tick, tick_step = torch.zeros(1 + len(RATIOS), device=device), time.time(), step
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= last_step:
            break
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = (step - epoch * steps_per_epoch) * args.batch_per_rank
        bar = common.progress(loader, epoch, args.epochs)
        for views in bar:
            for g in optimizer.param_groups:
                g["lr"] = lr_schedule[step]
            running += train_step(views, model, target, params_t, params_o, m_schedule[step], optimizer, scaler,
                                  level_weights, args, dtype, device)
            step += 1
            if step % args.log_every == 0 or step == last_step:
                losses = (running / (step - tick_step)).tolist()
                speed = (step - tick_step) * args.batch_size / (time.time() - tick)
                bar.set_postfix(loss=f"{losses[0]:.3f}", lr=f"{lr_schedule[step - 1]:.4f}", img_s=f"{speed:.0f}")
                log.write(step=step, epoch=epoch, loss=losses[0], level_losses=losses[1:], lr=lr_schedule[step - 1],
                          momentum=m_schedule[step - 1], images_per_s=speed)
                running.zero_()
                tick, tick_step = time.time(), step
            if step % args.save_every == 0:
                save()
            if step >= last_step:
                break
        loader.sampler.skip = 0
        save()
    # Downstream uses the online network (backbone, FPN and the region head's 4 convs), as MCL's converter.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "mcl", args.arch, student.online.encoder, student.online.fpn,
                               student.online.fpn.config,
                               extra={"region_head_convs": {k: v.detach().cpu() for k, v in student.online.head.convs.state_dict().items()}})
    common.print0(f"done: step {step}/{total_steps}; checkpoint {ckpt_path}; downstream weights {out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return student, target


if __name__ == "__main__":
    main()
