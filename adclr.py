"""ADCLR: patch-level contrasting without patch correspondence, on a DINO ViT.

Paper: Zhang, Zhu, Zhao, Yan, "Patch-level Contrasting without Patch Correspondence for Accurate and
Dense Contrastive Representation Learning", ICLR 2023, https://arxiv.org/abs/2306.13337. The authors
released no code: this file is, to our knowledge, the first public implementation. Every choice the
paper leaves open is a flag; their defaults are listed below and in the README.

Method. DINO (Caron et al. 2021): a student ViT and an EMA teacher ViT, each with a DINO head, see
multi-crop views; the student's output distribution on every view must match the teacher's
(centered, sharpened) distribution on the other global views. ADCLR adds Q *query patches*: random
crops of the original image, each resized to one patch and embedded by the ViT's patch embedding
as one extra token *without* positional embedding. The same Q query tokens are appended to both
global views (student and teacher). A unidirectional attention mask lets image tokens attend to
image tokens only (the DINO path is unchanged) and each query attend to the image tokens and to
itself. Because a query carries no position, its output can only be matched across views by its
index: the student's i-th query output in view A must match the teacher's i-th query output in
view B (a DINO loss with its own center). No parameters beyond DINO's.

Launch:
    python adclr.py                                                 # ViT-S/16 recipe, synthetic data
    python adclr.py --arch vit_micro --global-size 64 --local-size 32 --local-crops 2 --batch-size 32 \\
        --epochs 5 --synthetic-len 2048 --out-dim 4096 --lr 0.001  # CPU demo, a few minutes
    torchrun --nproc_per_node=8 adclr.py --data imagenet --batch-size 1024          # ViT-S/16
    torchrun --nproc_per_node=8 adclr.py --data imagenet --query-weight 0           # plain DINO

Reference results (abstract; not reproduced here): ViT-S/16 linear 77.5 (+0.5 over DINO); ViT-B/16
linear 79.8, fine-tune 84.0; COCO Mask R-CNN 44.3 AP box / 39.7 AP mask; ADE20K +1.0 mIoU over
SelfPatch.

Measured here (synthetic miniature, not the paper's protocol; README, `python bench.py quality
--seeds 0 1`): at 96 steps DINO and ADCLR (ViT-micro/8) are still at random init; every probe
predicts background (6.01 vs 6.02).

Open choices (the paper does not fix them; defaults here):
- --num-queries 10; --query-scale 0.05 0.25 (area fraction of the original image per query crop,
  the range of DINO's local crops); query crops get no photometric augmentation, only resizing to
  one patch (bicubic) and normalisation; they are shared by the two global views.
- --queries-see-each-other off: a query attends to the image tokens and itself only (the authors'
  follow-up code lets queries see each other; turn it on to match that).
- --query-weight (lambda) 1.0; the query loss uses the same DINO head as the CLS token, its own
  center (momentum 0.9) and the same temperatures.
- Queries are appended to the global views only; local crops are plain DINO crops.
Other deviations: DINO's recipe otherwise (AdamW, lr 5e-4 x N/256 with 10 warm-up epochs, cosine to
1e-6; weight decay 0.04 -> 0.4; teacher temperature 0.04 -> 0.07 over 30 epochs; EMA 0.996 -> 1;
per-parameter gradient clipping at 3.0; last layer frozen in epoch 1; 10 local crops at 96 px);
the DINO head's weight-normalised last layer is written as a row-normalised weight (g = 1).
"""
import argparse
import copy
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common


# =================================================================================================
# Arguments
# =================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="ADCLR pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="vit_small", help="vit_micro | vit_tiny | vit_small | vit_base (paper: vit_small)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension (DINO: 65536)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10, help="local crops per image (DINO ViT-S/16: 10)")
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.25, 1.0))
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.25))
    p.add_argument("--num-queries", type=int, default=10, help="query patches per image, Q (paper: 10)")
    p.add_argument("--query-scale", type=float, nargs=2, default=(0.05, 0.25), help="area range of query crops (open choice)")
    p.add_argument("--queries-see-each-other", action="store_true", help="let query tokens attend to each other")
    p.add_argument("--query-weight", type=float, default=1.0, help="lambda of the query loss; 0 = plain DINO")
    p.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA, cosine to 1 (DINO: 0.996)")
    p.add_argument("--teacher-temp", type=float, default=0.07, help="after warm-up (DINO ViT-S: 0.07)")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=30)
    p.add_argument("--student-temp", type=float, default=0.1)
    p.add_argument("--center-momentum", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW lr per 256 images (DINO: 5e-4)")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--weight-decay", type=float, default=0.04)
    p.add_argument("--weight-decay-end", type=float, default=0.4)
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm clip (DINO: 3.0)")
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen")
    p.add_argument("--output-dir", default="runs/adclr", help="checkpoint, log, args; a rerun resumes from here")
    common.add_data_args(p)
    common.add_run_args(p, epochs=100, batch_size=1024)
    args = p.parse_args(argv)
    args.image_size = args.global_size  # what common.build_pretrain_dataset sizes synthetic scenes by
    common.split_batch(p, args)
    for size in (args.global_size, args.local_size):
        if size % args.patch_size:
            p.error(f"crop size {size} is not a multiple of --patch-size {args.patch_size}")
    args.scaled_lr = args.lr * args.batch_size / 256  # linear scaling rule
    return args


# =================================================================================================
# Model
# =================================================================================================
class DINOHead(nn.Module):
    """3-layer MLP (GELU) to a 256-d bottleneck, L2-normalised, then a weight-normalised linear
    layer with its norm fixed to 1 (DINO's norm_last_layer), i.e. a row-normalised weight."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (..., in_dim) -> (..., out_dim)
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.last_layer.weight, dim=1))


def query_mask(num_image_tokens, num_queries, see_each_other, device):
    """(L, L) bool attention mask, True = may attend, tokens ordered [CLS, patches, queries]:
    image tokens see image tokens only (the DINO path is unchanged), each query sees the image
    tokens and itself (and the other queries with see_each_other)."""
    L = num_image_tokens + num_queries
    mask = torch.zeros(L, L, dtype=torch.bool, device=device)
    mask[:, :num_image_tokens] = True
    mask[num_image_tokens:, num_image_tokens:] = True if see_each_other else torch.eye(num_queries, dtype=torch.bool, device=device)
    return mask


class DINONet(nn.Module):
    """ViT + DINO head. forward(globals, locals, queries) runs every view in one call (one DDP
    forward per backward) and returns CLS outputs (V, B, K) and query outputs (2, B, Q, K)."""

    def __init__(self, args):
        super().__init__()
        self.vit = common.ViT(args.arch, args.patch_size, args.global_size)
        self.head = DINOHead(self.vit.embed_dim, args.out_dim)
        self.see_each_other = args.queries_see_each_other

    def forward(self, globals_, locals_=(), queries=None):
        B = globals_[0].shape[0]
        extra, mask = None, None
        if queries is not None:  # (B, Q, 3, p, p): one token each, by the shared patch embedding
            Q = queries.shape[1]
            extra = self.vit.embed(queries.flatten(0, 1)).view(B, Q, -1).repeat(len(globals_), 1, 1)  # (2B, Q, D)
            n_img = 1 + (globals_[0].shape[-1] // self.vit.patch_size) ** 2
            mask = query_mask(n_img, Q, self.see_each_other, queries.device)
        tokens = self.vit(torch.cat(list(globals_)), extra, mask)  # (2B, 1 + N + Q, D)
        cls = [tokens[:, 0]]
        if len(locals_):
            cls.append(self.vit(torch.cat(list(locals_)))[:, 0])  # (nL·B, D), one size for all locals
        cls_out = self.head(torch.cat(cls)).view(-1, B, self.head.last_layer.out_features)  # (V, B, K)
        if queries is None:
            return cls_out, None
        q_out = self.head(tokens[:, -Q:]).view(len(globals_), B, Q, -1)  # (2, B, Q, K)
        return cls_out, q_out


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


# =================================================================================================
# Loss
# =================================================================================================
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


def query_loss(student_q, teacher_q, center, student_temp, teacher_temp):
    """ADCLR's cross-view query loss: the student's i-th query in view A against the teacher's i-th
    query in view B (A != B). student_q, teacher_q: (2, B, Q, K); center: (K,)."""
    t = F.softmax((teacher_q - center) / teacher_temp, dim=-1)  # (2, B, Q, K)
    s = F.log_softmax(student_q / student_temp, dim=-1)
    ce = -torch.einsum("tbqk,vbqk->tv", t, s) / (s.shape[1] * s.shape[2])  # (2, 2)
    return (ce[0, 1] + ce[1, 0]) / 2


# =================================================================================================
# Data
# =================================================================================================
class MultiCropWithQueries:
    """DINO multi-crop (2 global + n local views) plus Q query crops of the original image."""

    def __init__(self, args):
        self.global1, self.global2 = common.byol_augmentations(args.global_size, scale=tuple(args.global_scale))
        self.local = v2.Compose([
            v2.RandomResizedCrop(args.local_size, scale=tuple(args.local_scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(common.blur_kernel(args.local_size), sigma=(0.1, 2.0))], p=0.5),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD),
        ])
        self.query = v2.Compose([
            v2.RandomResizedCrop(args.patch_size, scale=tuple(args.query_scale), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD),
        ])
        self.n_local, self.n_queries = args.local_crops, args.num_queries

    def __call__(self, img):
        queries = torch.stack([self.query(img) for _ in range(self.n_queries)]) if self.n_queries else torch.zeros(0)
        return [self.global1(img), self.global2(img)], [self.local(img) for _ in range(self.n_local)], queries


def build_data(args, device):
    """Multi-crop views and query crops of every image."""
    dataset = common.build_pretrain_dataset(args, MultiCropWithQueries(args))
    return common.make_loader(dataset, args.batch_per_rank, args.workers, args.seed, device)


# =================================================================================================
# Train step
# =================================================================================================
def train_step(batch, student, teacher, centers, params_t, params_s, optimizer, scaler, sched, epoch, args, dtype, device):
    """One ADCLR iteration; returns (total, DINO, query) loss tensors (no host sync)."""
    globals_, locals_, queries = batch
    globals_ = [g.to(device, non_blocking=True) for g in globals_]
    locals_ = [l.to(device, non_blocking=True) for l in locals_]
    queries = queries.to(device, non_blocking=True) if args.num_queries else None
    use_q = queries is not None and args.query_weight > 0
    with common.autocast(device, dtype):
        with torch.no_grad():
            ema_update(params_t, params_s, sched["momentum"])
            t_cls, t_q = teacher(globals_, (), queries if use_q else None)
        s_cls, s_q = student(globals_, locals_, queries if use_q else None)
        t_cls, s_cls = t_cls.float(), s_cls.float()
        l_dino = dino_loss(s_cls, t_cls, centers[0], args.student_temp, sched["teacher_temp"])
        l_query = query_loss(s_q.float(), t_q.float(), centers[1], args.student_temp, sched["teacher_temp"]) if use_q \
            else torch.zeros((), device=device)
        loss = l_dino + args.query_weight * l_query
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params_s if p.grad is not None]
    scale = torch._foreach_add(torch._foreach_norm(grads), 1e-6)  # DINO clips each parameter's gradient on its own
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, args.clip_grad)
    torch._foreach_clamp_max_(scale, 1.0)  # min(1, clip / |g|), one kernel per op for all parameters
    torch._foreach_mul_(grads, scale)
    if epoch < args.freeze_last_layer:  # DINO: the last layer stays fixed in the first epoch
        (student.module if hasattr(student, "module") else student).head.last_layer.weight.grad = None
    scaler.step(optimizer)
    scaler.update()
    update_center(centers[0], t_cls, args.center_momentum)
    if use_q:
        update_center(centers[1], t_q.float(), args.center_momentum)
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

    loader = build_data(args, device)
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    lr_schedule = common.cosine_schedule(args.scaled_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    wd_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    m_schedule = common.momentum_schedule(args.momentum_teacher, args.epochs, steps_per_epoch)
    warm = min(args.warmup_teacher_temp_epochs, args.epochs)
    temp_per_epoch = np.concatenate([np.linspace(args.warmup_teacher_temp, args.teacher_temp, warm),
                                     np.full(args.epochs - warm, args.teacher_temp)])
    common.print0(f"ADCLR | {args.arch}/{args.patch_size} | Q = {args.num_queries}, lambda {args.query_weight} | "
                  f"{world} x {args.batch_per_rank} images | lr {args.scaled_lr:g} | {args.epochs} epochs x "
                  f"{steps_per_epoch} steps | amp {dtype} | device {device} | output {out}")

    student = DINONet(args).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    centers = torch.zeros(2, args.out_dim, device=device)  # CLS center, query center
    params_s, params_t = list(student.parameters()), list(teacher.parameters())
    common.seed_everything(args.seed + rank)
    decay = [p for p in params_s if p.ndim > 1]
    no_decay = [p for p in params_s if p.ndim <= 1]  # biases and norms: no weight decay (DINO)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.scaled_lr,
                                  foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    ckpt_path = out / "checkpoint.pth"
    state = {"student": student, "teacher": teacher}
    step, ckpt = common.resume(ckpt_path, state, optimizer, scaler, device)
    if ckpt is not None:
        centers.copy_(ckpt["centers"])  # CLS and query centers
    save = lambda: common.save_checkpoint(ckpt_path, state, optimizer, scaler, step, args, {"centers": centers})

    model_s = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    if args.compile:
        model_s = torch.compile(model_s)
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    running, tick, tick_step = torch.zeros(3, device=device), time.time(), step
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= last_step:
            break
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = (step - epoch * steps_per_epoch) * args.batch_per_rank
        bar = common.progress(loader, epoch, args.epochs)
        for batch in bar:
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr_schedule[step]
            optimizer.param_groups[0]["weight_decay"] = wd_schedule[step]
            sched = {"momentum": m_schedule[step], "teacher_temp": float(temp_per_epoch[epoch])}
            running += train_step(batch, model_s, teacher, centers, params_t, params_s, optimizer, scaler, sched, epoch,
                                  args, dtype, device)
            step += 1
            if step % args.log_every == 0 or step == last_step:
                loss, l_dino, l_query = (running / (step - tick_step)).tolist()
                speed = (step - tick_step) * args.batch_size / (time.time() - tick)
                bar.set_postfix(loss=f"{loss:.3f}", query=f"{l_query:.3f}", lr=f"{lr_schedule[step - 1]:.2e}", img_s=f"{speed:.0f}")
                log.write(step=step, epoch=epoch, loss=loss, loss_dino=l_dino, loss_query=l_query, lr=lr_schedule[step - 1],
                          teacher_temp=sched["teacher_temp"], images_per_s=speed)
                running.zero_()
                tick, tick_step = time.time(), step
            if step % args.save_every == 0:
                save()
            if step >= last_step:
                break
        loader.sampler.skip = 0
        save()
    # Downstream uses the teacher ViT, as DINO's evaluation scripts.
    if common.is_main():
        common.save_downstream(out / "downstream.pth", "adclr" if args.query_weight > 0 else "dino", args.arch,
                               teacher.vit, extra={"patch_size": args.patch_size, "img_size": args.global_size})
    common.print0(f"done: step {step}/{total_steps}; checkpoint {ckpt_path}; downstream weights {out / 'downstream.pth'}")
    if world > 1:
        dist.destroy_process_group()
    return student, teacher


if __name__ == "__main__":
    main()
