"""adclr.py's DINO part (--query-weight 0) against facebookresearch/dino.

The official side runs main_dino.py's own pieces: its networks as train_dino builds them
(vision_transformer.vit_*, utils.MultiCropWrapper, DINOHead, the teacher loading the student's
weights, DDP around the student), its DINOLoss, utils.get_params_groups + AdamW, its schedules
(utils.cosine_scheduler) and its train_one_epoch (clipping, last-layer freeze, EMA after the step).
train_one_epoch gets a list of batches as its data loader. The ViT's positional embedding is the
224-px one of train_dino on both sides, interpolated to the small crops (DINO's
interpolate_pos_encoding and common.ViT.pos_for).

Stochastic depth draws its masks differently on the two sides (torch.rand + floor against
bernoulli_): the masks the official student draws are recorded and replayed in the method file's.
"""
import argparse
import contextlib
import io
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from official import cpu_cuda, import_file, import_project, load_mapped, mapped_grads

BATCH_PER_RANK, LOCAL_CROPS, OUT_DIM, EPOCHS = 2, 2, 256, 3


def model_key(k):
    """utils.MultiCropWrapper(VisionTransformer, DINOHead) key -> adclr.DINONet key (same names below)."""
    if k.startswith("backbone."):
        return "vit." + k[len("backbone."):]
    if k.startswith("head."):
        return k
    raise KeyError(k)


def batch(step, rank, global_size, local_size):
    """Two global and LOCAL_CROPS local views of this rank's images at `step`."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    globals_ = [torch.randn(BATCH_PER_RANK, 3, global_size, global_size, generator=g) for _ in range(2)]
    locals_ = [torch.randn(BATCH_PER_RANK, 3, local_size, local_size, generator=g) for _ in range(LOCAL_CROPS)]
    return globals_, locals_


def import_dino(path):
    """main_dino.py, with the official utils and vision_transformer it imports by name."""
    sys.path.insert(0, str(path))
    try:
        utils = import_file(path / "utils.py", "utils")
        vits = import_file(path / "vision_transformer.py", "vision_transformer")
        main_dino = import_file(path / "main_dino.py", "official_main_dino")
    finally:
        sys.path.remove(str(path))
    return utils, vits, main_dino


def check(path, cli, table, notes):
    arch, size = cli.arch or "vit_tiny", cli.image_size or 48
    local_size, patch = 32, 16
    world, rank = dist.get_world_size(), dist.get_rank()
    utils, vits, main_dino = import_dino(path)
    adclr, common = import_project("adclr"), import_project("common")
    steps = cli.steps
    args = adclr.get_args(["--arch", arch, "--patch-size", str(patch), "--global-size", "224", "--local-size",
                           str(local_size), "--local-crops", str(LOCAL_CROPS), "--num-queries", "0", "--query-weight",
                           "0", "--out-dim", str(OUT_DIM), "--batch-size", str(BATCH_PER_RANK * world), "--epochs",
                           str(EPOCHS), "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "2", "--lr", "0.064",
                           "--momentum-teacher", "0.9", "--amp", "fp32", "--norm-last-layer", "true"])
    notes.add(f"{arch}/{patch}, globals {size} px, {LOCAL_CROPS} locals {local_size} px, {BATCH_PER_RANK} images per "
              f"process, out dim {OUT_DIM}, drop path {args.drop_path}, clip {args.clip_grad}; schedules over "
              f"{EPOCHS} epochs of {steps} steps (1 warm-up); the steps compared are epoch 1's (after the warm-up, "
              f"last layer no longer frozen), teacher EMA 0.9 -> 1, AdamW lr {args.scaled_lr:g}")
    notes.add("official: main_dino.train_one_epoch itself; stand-ins: torch.cuda.synchronize and "
              "MetricLogger.synchronize_between_processes do nothing (logging only; they need CUDA)")

    # ---- official, as train_dino builds it
    torch.manual_seed(0)
    student = utils.MultiCropWrapper(vits.__dict__[arch](patch_size=patch, drop_path_rate=args.drop_path),
                                     main_dino.DINOHead(vits.__dict__[arch]().embed_dim, OUT_DIM, use_bn=False,
                                                        norm_last_layer=True))
    embed_dim = student.backbone.embed_dim
    teacher = utils.MultiCropWrapper(vits.__dict__[arch](patch_size=patch), main_dino.DINOHead(embed_dim, OUT_DIM, False))
    student = nn.parallel.DistributedDataParallel(student)
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(OUT_DIM, LOCAL_CROPS + 2, args.warmup_teacher_temp, args.teacher_temp,
                                   args.warmup_teacher_temp_epochs, EPOCHS)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    lr_schedule = utils.cosine_scheduler(args.lr * BATCH_PER_RANK * world / 256., args.min_lr, EPOCHS, steps,
                                         warmup_epochs=1)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, EPOCHS, steps)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, EPOCHS, steps)

    # ---- the method file's, as adclr.main builds it, with the official weights
    mine_s = adclr.DINONet(args, drop_path=args.drop_path)
    load_mapped(mine_s, student.module.state_dict(), model_key)
    mine_t = adclr.DINONet(args).requires_grad_(False)
    load_mapped(mine_t, teacher.state_dict(), model_key)
    centers = torch.zeros(2, OUT_DIM)
    params_s, params_t = list(mine_s.parameters()), list(mine_t.parameters())
    trained = [p for p in params_s if p.requires_grad]
    my_opt = torch.optim.AdamW([{"params": [p for p in trained if p.ndim > 1]},
                                {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}],
                               lr=args.scaled_lr, foreach=True)
    model_s = nn.parallel.DistributedDataParallel(mine_s) if world > 1 else mine_s
    my_lr, my_wd, my_m, my_temp = adclr.schedules(args, steps)
    table.add("schedule: lr", torch.as_tensor(lr_schedule), torch.as_tensor(my_lr))
    table.add("schedule: weight decay", torch.as_tensor(wd_schedule), torch.as_tensor(my_wd))
    table.add("schedule: teacher momentum", torch.as_tensor(momentum_schedule), torch.as_tensor(my_m))
    table.add("schedule: teacher temperature", torch.as_tensor(dino_loss.teacher_temp_schedule), torch.as_tensor(my_temp))

    # ---- official epoch 1: record its losses, the gradients the optimizer steps with, the drop-path masks
    epoch = 1
    batches = [batch(step, rank, size, local_size) for step in range(1, steps + 1)]
    losses, grads, masks = [], [], []
    loss_forward = dino_loss.forward
    dino_loss.forward = lambda *a: losses.append(loss_forward(*a)) or losses[-1]
    optimizer.register_step_pre_hook(lambda *_: grads.append(mapped_grads(student.module.named_parameters(), model_key)))
    drop_path = vits.drop_path

    def recording_drop_path(x, drop_prob=0., training=False):
        out = drop_path(x, drop_prob, training)
        if drop_prob > 0 and training:
            masks.append((out.flatten(1) != 0).any(1).to(x.dtype))  # (B,): 1 = branch kept
        return out

    vits.drop_path = recording_drop_path
    official_args = argparse.Namespace(epochs=EPOCHS, clip_grad=args.clip_grad, freeze_last_layer=args.freeze_last_layer)
    saved = torch.cuda.synchronize, utils.MetricLogger.synchronize_between_processes
    torch.cuda.synchronize, utils.MetricLogger.synchronize_between_processes = (lambda *a, **k: None,) * 2
    try:
        with cpu_cuda(notes), contextlib.redirect_stdout(io.StringIO()):
            main_dino.train_one_epoch(student, teacher, teacher, dino_loss,
                                      [([t.clone() for t in g + l], None) for g, l in batches], optimizer,
                                      lr_schedule, wd_schedule, momentum_schedule, epoch, None, official_args)
    finally:
        torch.cuda.synchronize, utils.MetricLogger.synchronize_between_processes = saved
        vits.drop_path = drop_path

    # ---- the method file's epoch 1, replaying the official drop-path masks
    replay = list(masks)

    def replayed_drop_path(x, p, training):
        if p == 0 or not training:
            return x
        keep = replay.pop(0)
        assert keep.shape[0] == x.shape[0], "drop-path calls out of order"
        return x * keep.view(-1, *(1,) * (x.ndim - 1)) / (1 - p)

    own_drop_path = common.drop_path
    common.drop_path = replayed_drop_path
    try:
        for i, (g, l) in enumerate(batches):
            step = epoch * steps + i
            my_opt.param_groups[0]["lr"] = my_opt.param_groups[1]["lr"] = my_lr[step]
            my_opt.param_groups[0]["weight_decay"] = my_wd[step]
            state = adclr.State(model_s, mine_t, centers[0], centers[1], my_opt,
                                torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
            loss = adclr.train_step(([t.clone() for t in g], [t.clone() for t in l], torch.zeros(0)), state, epoch,
                                    my_m[step], float(my_temp[epoch]), args)
            table.add(f"step {i + 1}: loss", losses[i].detach(), loss[0])
            table.add(f"step {i + 1}: gradients (clipped)", grads[i],
                      {n: p.grad for n, p in mine_s.named_parameters() if p.grad is not None})
    finally:
        common.drop_path = own_drop_path
    notes.add(f"drop-path masks: {len(masks)} drawn by the official student, replayed in the method file's "
              f"({len(masks) - len(replay)} used)")
    if replay:
        table.rows.append(("drop-path masks left unused", float(len(replay)), 1.0, "DIFFERENT", ""))

    table.add(f"after {steps}: student", {model_key(k): v for k, v in student.module.state_dict().items()},
              mine_s.state_dict())
    table.add(f"after {steps}: teacher (EMA)", {model_key(k): v for k, v in teacher.state_dict().items()},
              mine_t.state_dict())
    table.add(f"after {steps}: center", dino_loss.center.view(-1), centers[0])
