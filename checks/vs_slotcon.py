"""decon.py --decoder none (plain SlotCon, DeCon's baseline framework) against CVMI-Lab/SlotCon
(models/slotcon.py, models/resnet.py, utils/lars.py, utils/lr_scheduler.py).

The official side: SlotCon(resnet.<arch>, args) in DDP, its LARS over model.parameters(), its
get_scheduler stepped once per iteration, main_pretrain.train's zero_grad / backward / step. The
steps compared are those of epoch 2 (after one warm-up epoch), entered as main_pretrain resumes:
the scheduler stepped through epoch 1 and SlotCon.re_init with start_epoch 2. The views, their
overlap boxes and flip flags are injected on both sides (SlotCon's data/transforms.py, which makes
them from crops, is not compared).

SyncBatchNorm: torch's needs CUDA under a process group, so on this CPU the official
nn.SyncBatchNorm.convert_sync_batchnorm is a stand-in that converts nothing: BatchNorm per process
on both sides (common.sync_batchnorm converts on CUDA only, so decon.py runs the same way here).
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn

from official import cpu_cuda, from_rank0, import_file, import_project, is_bn_statistic, load_mapped, mapped_grads

BATCH_PER_RANK, EPOCHS = 4, 3


def model_key(k):
    """Official SlotCon key -> key in the method file's {student, teacher, predictors}."""
    for official, mine in (("encoder_q.", "student.encoder."), ("encoder_k.", "teacher.encoder."),
                           ("projector_q.mlp.", "student.heads.0.projector."),
                           ("projector_k.mlp.", "teacher.heads.0.projector."),
                           ("grouping_q.slot_embed.", "student.heads.0.prototypes."),
                           ("grouping_k.slot_embed.", "teacher.heads.0.prototypes."),
                           ("predictor_slot.mlp.", "predictors.0.")):
        if k.startswith(official):
            return mine + k[len(official):]
    if k == "center":
        return None  # compared on its own (decon.py keeps centers outside the modules)
    raise KeyError(k)


def batch(step, rank, size):
    """Two views, each view's overlap box (x0, y0, x1, y1) in [0, 1] and flip flags."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    views = [torch.randn(BATCH_PER_RANK, 3, size, size, generator=g) for _ in range(2)]
    lo = torch.rand(BATCH_PER_RANK, 2, 2, generator=g) * 0.4
    hi = lo + 0.3 + torch.rand(BATCH_PER_RANK, 2, 2, generator=g) * 0.3
    boxes = torch.cat([lo, hi], -1)  # (B, 2, 4)
    flips = torch.rand(BATCH_PER_RANK, 2, generator=g) < 0.5  # (B, 2)
    return views, boxes, flips


def check(path, cli, table, notes):
    arch, size = cli.arch or "resnet18", cli.image_size or 96
    world, rank = dist.get_world_size(), dist.get_rank()
    steps = cli.steps
    resnet = import_file(path / "models" / "resnet.py", "official_slotcon_resnet")
    slotcon = import_file(path / "models" / "slotcon.py", "official_slotcon")
    lars = import_file(path / "utils" / "lars.py", "official_slotcon_lars")
    lr_scheduler = import_file(path / "utils" / "lr_scheduler.py", "official_slotcon_lr_scheduler")
    decon, common = import_project("decon"), import_project("common")
    args = decon.get_args(["--decoder", "none", "--arch", arch, "--image-size", str(size), "--num-prototypes", "16",
                           "--dim-hidden", "64", "--dim-out", "32", "--teacher-momentum", "0.9", "--batch-size",
                           str(BATCH_PER_RANK * world), "--epochs", str(EPOCHS), "--warmup-epochs", "1", "--lr", "2.0",
                           "--amp", "fp32"])
    notes.add(f"{arch} at {size} px ({(size // 32) ** 2} C5 pixels), {BATCH_PER_RANK} images per process, K 16 "
              f"prototypes, hidden 64, out 32, teacher momentum 0.9 -> 1; LARS base lr {args.lr} x N/256, "
              f"{EPOCHS} epochs of {steps} steps, 1 warm-up epoch; steps compared: epoch 2's")
    notes.add("stand-in: nn.SyncBatchNorm.convert_sync_batchnorm converts nothing (torch's SyncBatchNorm needs CUDA): "
              "BatchNorm per process on both sides")

    # ---- official, as main_pretrain.build_model builds it (with the released scripts' --optimizer lars)
    official_args = argparse.Namespace(
        arch=arch, dim_hidden=args.dim_hidden, dim_out=args.dim_out, teacher_momentum=args.teacher_momentum,
        group_loss_weight=args.group_loss_weight, student_temp=args.student_temp, teacher_temp=args.teacher_temp,
        num_prototypes=args.num_prototypes, center_momentum=args.center_momentum,
        num_instances=steps * BATCH_PER_RANK * world, world_size=world, batch_size=BATCH_PER_RANK, epochs=EPOCHS,
        start_epoch=1, warmup_epoch=1, warmup_multiplier=100, base_lr=args.lr)
    torch.manual_seed(0)
    convert = nn.SyncBatchNorm.convert_sync_batchnorm
    nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, process_group=None: module)
    try:
        ref = slotcon.SlotCon(resnet.__dict__[arch], official_args)
    finally:
        nn.SyncBatchNorm.convert_sync_batchnorm = convert
    ref_opt = lars.LARS(ref.parameters(), lr=BATCH_PER_RANK * world / 256 * args.lr, momentum=0.9,
                        weight_decay=args.weight_decay)
    ref_ddp = nn.parallel.DistributedDataParallel(ref)
    scheduler = lr_scheduler.get_scheduler(ref_opt, steps, official_args)

    # ---- the method file's, as decon.main builds it, with the official weights
    student, teacher = decon.Network(args), decon.Network(args).requires_grad_(False)
    predictors = nn.ModuleList([decon.mlp(args.dim_out, args.dim_hidden, args.dim_out, conv=False)])
    mine = nn.ModuleDict({"student": student, "teacher": teacher, "predictors": predictors})
    load_mapped(mine, ref.state_dict(), model_key)
    centers = [ref.center.view(-1).clone()]
    optimizer = common.LARS(common.lars_param_groups(nn.ModuleList([student, predictors])), lr=args.scaled_lr,
                            weight_decay=args.weight_decay)
    model_s = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    lr_schedule, m_schedule = decon.schedules(args, steps)

    # Official lr of every step, from its scheduler (one step per iteration, from construction on).
    official_lr = []
    for _ in range(EPOCHS * steps):
        official_lr.append(ref_opt.param_groups[0]["lr"])
        scheduler.step()
    table.add("schedule: lr", torch.tensor(official_lr), torch.tensor(lr_schedule))
    scheduler = lr_scheduler.get_scheduler(ref_opt, steps, official_args)
    for _ in range(steps):  # epoch 1 done, as a resume into epoch 2 would have it
        scheduler.step()
    official_args.start_epoch = 2
    ref.re_init(official_args)

    for i in range(steps):
        step = steps + i
        views, boxes, flips = batch(step, rank, size)
        with cpu_cuda(notes):
            loss_ref = ref_ddp(([v.clone() for v in views], [boxes[:, 0].clone(), boxes[:, 1].clone()],
                                [flips[:, 0].clone(), flips[:, 1].clone()]))
        ref_opt.zero_grad()
        loss_ref.backward()
        ref_opt.step()
        grads = mapped_grads(ref.named_parameters(), model_key)
        scheduler.step()
        for g in optimizer.param_groups:
            g["lr"] = lr_schedule[step]
        state = decon.State(model_s, teacher, predictors, centers, decon.head_weights(args, 1), decon.group_weights(args, 1),
                            optimizer, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
        loss = decon.train_step(([v.clone() for v in views], boxes.clone(), flips.clone()), state, m_schedule[step], args)
        table.add(f"step {i + 1}: loss", loss_ref.detach(), loss[0])
        my_grads = {f"student.{n}": p.grad for n, p in student.named_parameters() if p.grad is not None}
        my_grads.update({f"predictors.{n}": p.grad for n, p in predictors.named_parameters() if p.grad is not None})
        table.add(f"step {i + 1}: gradients", grads, my_grads)

    ref_state = {model_key(k): v for k, v in ref.state_dict().items() if model_key(k) is not None}
    my_state = mine.state_dict()
    after = f"after {steps}:"
    pick = lambda state, part, stats: {k: v.double() for k, v in state.items()
                                       if k.startswith(part + ".") and is_bn_statistic(k) == stats}
    for part in ("student", "teacher", "predictors"):
        name = f"{after} {part}{' (EMA)' if part == 'teacher' else ''}"
        table.add(f"{name} weights", pick(ref_state, part, False), pick(my_state, part, False))
        if part == "student":  # in DDP on both sides: its statistics are rank 0's on every rank
            table.add(f"{name} BN statistics", pick(ref_state, part, True), pick(my_state, part, True))
        else:
            table.add(f"{name} BN statistics (rank 0)", from_rank0(pick(ref_state, part, True)),
                      from_rank0(pick(my_state, part, True)))
    notes.add("teacher and predictor BN running statistics: rank 0's on both sides (the official DDP wraps the whole "
              "SlotCon module and re-broadcasts rank 0's buffers each forward; decon.py's DDP wraps the student only)")
    table.add(f"{after} center", ref.center.view(-1), centers[0])
