"""decon.py (DeCon-SL: FPN decoder, P2 head, over SlotCon; DeCon-ML through vs_decon_ml.py) against the DeCon authors' code: their
SlotCon fork's models/slotcon.py (SlotCon(..., use_decoder=True), decoder_q / decoder_k) and
decoder.py (FPNDecoder over detectron2's FPN, CustomEncoder_FPN), found under PATH.

The fork's resnet.py beside slotcon.py and a lars.py under PATH are used as found (SlotCon's).
Its training loop is SlotCon's main_pretrain.train with the fork's forward returning (loss, logs):
LARS over model.parameters(), zero_grad, backward, step; the steps compared are epoch 2's, entered
as a resume does (re_init with start_epoch 2). CustomEncoder_FPN knows resnet50's channels only:
the check runs resnet50 (64 px, narrow heads).

Two defects of that code are not reproduced by decon.py (its docstring): _momentum_update_key_decoder
advances the step counter k a second time per iteration (so the decoder uses the momentum of step
k + 1 and the schedule runs twice as fast), and the teacher decoder prototypes (dec_grouping_k) are
never EMA-updated. By default the check emulates decon.py's behaviour on the official side only:
the decoder update is run at the encoder's k (k advances once) and dec_grouping_k is EMA-updated with
the same momentum; --keep-defects runs the official code as it is.
"""
import argparse
import math
import re

import torch
import torch.distributed as dist
import torch.nn as nn

from official import cpu_cuda, from_rank0, import_file, import_project, is_bn_statistic, load_mapped, mapped_grads
from stand_ins import install_detectron2
from vs_slotcon import BATCH_PER_RANK, EPOCHS, batch

KEEP_DEFECTS = False  # set by official.py --keep-defects
DEEP_SUPERVISION = False  # DeCon-ML: vs_decon_ml.py sets it
FCN = False  # the FCN decoder on C5: vs_decon_fcn.py sets it


def model_key(k):
    """DeCon SlotCon key -> key in decon.py's {student, teacher, predictors}; heads and predictors:
    0 = encoder, 1 = P2 (DeCon-SL) or 1-4 = P2-P5 (DeCon-ML, the official ModuleLists' index + 1)."""
    m = re.fullmatch(r"decoder_([qk])\.fpn_(lateral|output)(\d)\.(norm\.)?(.+)", k)
    if m:
        net = "student" if m[1] == "q" else "teacher"
        which = "1" if m[4] else "0"
        if m[2] == "lateral":
            return f"{net}.decoder.lateral.{int(m[3]) - 2}.{which}.{m[5]}"
        return f"{net}.decoder.output.p{m[3]}.{which}.{m[5]}"
    m = re.fullmatch(r"decoder_([qk])\.convs\.(\d)\.(conv|bn)\.(.+)", k)  # FCN: two conv-BN-ReLU modules
    if m:
        net = "student" if m[1] == "q" else "teacher"
        return f"{net}.decoder.{3 * int(m[2]) + (0 if m[3] == 'conv' else 1)}.{m[4]}"
    m = re.fullmatch(r"dec_(projector|grouping)_([qk])\.(?:(\d)\.)?(mlp|slot_embed)\.(.+)", k)
    if m:
        net, head = ("student" if m[2] == "q" else "teacher"), 1 + int(m[3] or 0)
        return f"{net}.heads.{head}.{'projector' if m[1] == 'projector' else 'prototypes'}.{m[5]}"
    m = re.fullmatch(r"dec_predictor_slot\.(?:(\d)\.)?mlp\.(.+)", k)
    if m:
        return f"predictors.{1 + int(m[1] or 0)}.{m[2]}"
    for official, mine in (("encoder_q.", "student.encoder."), ("encoder_k.", "teacher.encoder."),
                           ("projector_q.mlp.", "student.heads.0.projector."),
                           ("projector_k.mlp.", "teacher.heads.0.projector."),
                           ("grouping_q.slot_embed.", "student.heads.0.prototypes."),
                           ("grouping_k.slot_embed.", "teacher.heads.0.prototypes."),
                           ("predictor_slot.mlp.", "predictors.0.")):
        if k.startswith(official):
            return mine + k[len(official):]
    if k == "center" or k.startswith("center_dec"):
        return None  # compared on their own
    raise KeyError(k)


def find(path, name, must_contain):
    """The one file called `name` under PATH whose text contains `must_contain`."""
    found = [p for p in path.rglob(name) if must_contain in p.read_text(errors="ignore")]
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one {name} containing {must_contain!r}, found {len(found)}; --official must "
                         f"be a checkout of the DeCon authors' repository")
    return found[0]


def check(path, cli, table, notes):
    arch, size = cli.arch or ("resnet18" if FCN else "resnet50"), cli.image_size or (96 if FCN else 64)
    world, rank = dist.get_world_size(), dist.get_rank()
    steps = cli.steps
    slotcon_file = find(path, "slotcon.py", "decoder_q")
    install_detectron2(notes)
    resnet = import_file(slotcon_file.parent / "resnet.py", "official_decon_resnet")
    slotcon = import_file(slotcon_file, "official_decon_slotcon")  # imports decoder.py from parents[2] itself
    lars = import_file(find(path, "lars.py", "class LARS"), "official_decon_lars")
    decon, common = import_project("decon"), import_project("common")
    ml = ["--deep-supervision", "--skip-channel-dropout", "0.5"] if DEEP_SUPERVISION else []
    decoder = ["--decoder", "fcn", "--fcn-channels", "512", "--fcn-dilation", "1"] if FCN else ["--decoder", "fpn"]
    args = decon.get_args(ml + decoder + ["--arch", arch, "--image-size", str(size), "--num-prototypes", "16",
                           "--dim-hidden", "64", "--dim-out", "32", "--teacher-momentum", "0.9", "--batch-size",
                           str(BATCH_PER_RANK * world), "--epochs", str(EPOCHS), "--warmup-epochs", "1", "--lr", "2.0",
                           "--amp", "fp32"])
    variant = ("DeCon with the FCN decoder (the official ade20k setting: 512 channels, dilation 1)" if FCN else
               "DeCon-ML (P2-P5, skip channel dropout 0.5, seeded alike)" if DEEP_SUPERVISION else "DeCon-SL")
    notes.add(f"{variant}: {arch} at {size} px (C5 {size // 32} x {size // 32}, P2 {size // 4} x {size // 4}), "
              f"{BATCH_PER_RANK} images per process, K 16 prototypes per head, hidden 64, out 32, alpha "
              f"{args.alpha}, teacher momentum 0.9 -> 1; LARS base lr {args.lr} x N/256 constant over "
              f"the {steps} steps compared (epoch 2 of {EPOCHS})")
    notes.add("official training loop: SlotCon's main_pretrain.train (the fork's own was not available here)")
    notes.add("stand-in: nn.SyncBatchNorm.convert_sync_batchnorm converts nothing (torch's SyncBatchNorm needs CUDA)")

    official_args = argparse.Namespace(
        arch=arch, dim_hidden=args.dim_hidden, dim_out=args.dim_out, teacher_momentum=args.teacher_momentum,
        decoder_downstream_dataset="ade20k" if FCN else "cityscapes", decoder_type="FCN" if FCN else "FPN", no_ddp=False, sk_dropout_prob=0.0,
        sk_channel_dropout_prob=args.skip_channel_dropout, decoder_deep_supervision=DEEP_SUPERVISION,
        group_loss_weight=args.group_loss_weight, group_loss_weight_dec=args.decoder_group_loss_weight, encoder_loss_weight=args.alpha,
        student_temp=args.student_temp, teacher_temp=args.teacher_temp, num_prototypes=args.num_prototypes,
        num_prototypes_dec=0, center_momentum=args.center_momentum, num_instances=steps * BATCH_PER_RANK * world,
        world_size=world, batch_size=BATCH_PER_RANK, epochs=EPOCHS, start_epoch=1)
    torch.manual_seed(0)
    convert = nn.SyncBatchNorm.convert_sync_batchnorm
    nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, process_group=None: module)
    try:
        ref = slotcon.SlotCon(resnet.__dict__[arch], official_args, use_decoder=True)
    finally:
        nn.SyncBatchNorm.convert_sync_batchnorm = convert
    if not KEEP_DEFECTS:
        decoder_update = ref._momentum_update_key_decoder

        @torch.no_grad()
        def fixed_decoder_update():
            ref.k -= 1  # the encoder update this iteration advanced k: use its step, advance k once per iteration
            m = 1. - (1. - ref.teacher_momentum) * (math.cos(math.pi * ref.k / ref.K) + 1.) * 0.5
            decoder_update()
            for q, k in zip(ref.dec_grouping_q.parameters(), ref.dec_grouping_k.parameters()):
                k.data = k.data * m + q.data * (1. - m)  # the teacher decoder prototypes follow the student's

        ref._momentum_update_key_decoder = fixed_decoder_update
        notes.add("EMULATED on the official side only: the decoder EMA at the encoder's step k (k advances once per "
                  "iteration) and dec_grouping_k EMA-updated (the official code advances k twice and never updates "
                  "it; decon.py does neither: --keep-defects shows the official code as it is)")
    else:
        notes.add("--keep-defects: the official code as it is (k advances twice per iteration, dec_grouping_k fixed)")
    ref_opt = lars.LARS(ref.parameters(), lr=BATCH_PER_RANK * world / 256 * args.lr, momentum=0.9,
                        weight_decay=args.weight_decay)
    ref_ddp = nn.parallel.DistributedDataParallel(ref)
    official_args.start_epoch = 2  # as a resume into epoch 2
    ref.re_init(official_args)

    student, teacher = decon.Network(args), decon.Network(args).requires_grad_(False)
    n_heads = len(student.heads)
    predictors = nn.ModuleList([decon.mlp(args.dim_out, args.dim_hidden, args.dim_out, conv=False)
                                for _ in range(n_heads)])
    mine = nn.ModuleDict({"student": student, "teacher": teacher, "predictors": predictors})
    load_mapped(mine, ref.state_dict(), model_key)
    dec_centers = [f"center_dec_{i}" for i in range(4)] if DEEP_SUPERVISION else ["center_dec"]
    centers = [ref.center.view(-1).clone()] + [getattr(ref, c).view(-1).clone() for c in dec_centers]
    optimizer = common.LARS(common.lars_param_groups(nn.ModuleList([student, predictors])), lr=args.scaled_lr,
                            weight_decay=args.weight_decay)
    model_s = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    _, m_schedule = decon.schedules(args, steps)

    for i in range(steps):
        step = steps + i
        views, boxes, flips = batch(step, rank, size)
        torch.manual_seed(step)  # the skip-connection dropout masks (DeCon-ML): the same draws, in the same order
        with cpu_cuda(notes):
            loss_ref, logs = ref_ddp(([v.clone() for v in views], [boxes[:, 0].clone(), boxes[:, 1].clone()],
                                      [flips[:, 0].clone(), flips[:, 1].clone()]))
        ref_opt.zero_grad()
        loss_ref.backward()
        ref_opt.step()
        grads = mapped_grads(ref.named_parameters(), model_key)
        torch.manual_seed(step)
        state = decon.State(model_s, teacher, predictors, centers, decon.head_weights(args, n_heads),
                            decon.group_weights(args, n_heads), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                            None, torch.device("cpu"))
        loss = decon.train_step(([v.clone() for v in views], boxes.clone(), flips.clone()), state, m_schedule[step], args)
        table.add(f"step {i + 1}: loss", loss_ref.detach(), loss[0])
        table.add(f"step {i + 1}: encoder head loss", logs["encoder_loss"].detach(), loss[1])
        table.add(f"step {i + 1}: decoder head loss{' (mean of P2-P5)' if DEEP_SUPERVISION else '' if FCN else ' (P2)'}",
                  logs["decoder_loss"].detach(), loss[2:].mean())
        my_grads = {f"student.{n}": p.grad for n, p in student.named_parameters() if p.grad is not None}
        my_grads.update({f"predictors.{n}": p.grad for n, p in predictors.named_parameters() if p.grad is not None})
        table.add(f"step {i + 1}: gradients", grads, my_grads)

    ref_state = {model_key(k): v for k, v in ref.state_dict().items() if model_key(k) is not None}
    my_state = mine.state_dict()
    after = f"after {steps}:"
    pick = lambda state, prefix, stats: {k: v.double() for k, v in state.items()
                                         if k.startswith(prefix) and is_bn_statistic(k) == stats}
    table.add(f"{after} student weights", pick(ref_state, "student.", False), pick(my_state, "student.", False))
    table.add(f"{after} student BN statistics", pick(ref_state, "student.", True), pick(my_state, "student.", True))
    for part, name in (("encoder.", "teacher encoder"), ("decoder.", f"teacher decoder ({'FCN' if FCN else 'FPN'})"),
                       ("heads.0.projector.", "teacher encoder projector"),
                       ("heads.0.prototypes.", "teacher encoder prototypes")):
        table.add(f"{after} {name} (EMA)", pick(ref_state, "teacher." + part, False), pick(my_state, "teacher." + part, False))
    for part in ("projector", "prototypes"):
        dec = lambda state: {k: v.double() for k, v in state.items() if re.match(rf"teacher\.heads\.[1-9]\.{part}\.", k)
                             and not is_bn_statistic(k)}
        table.add(f"{after} teacher decoder {part} (EMA)", dec(ref_state), dec(my_state))
    table.add(f"{after} teacher BN statistics (rank 0)", from_rank0(pick(ref_state, "teacher.", True)),
              from_rank0(pick(my_state, "teacher.", True)))
    table.add(f"{after} predictors weights", pick(ref_state, "predictors.", False), pick(my_state, "predictors.", False))
    table.add(f"{after} predictors BN statistics (rank 0)", from_rank0(pick(ref_state, "predictors.", True)),
              from_rank0(pick(my_state, "predictors.", True)))
    table.add(f"{after} encoder center", ref.center.view(-1), centers[0])
    for c, mine_c in zip(dec_centers, centers[1:]):
        table.add(f"{after} decoder center{c[len('center_dec'):]}", getattr(ref, c).view(-1), mine_c)
