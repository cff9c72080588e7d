"""mcl.py against GuoQiushan/MCL (openselfsup/models/mcl.py, necks.py FPN and DetConvGpNonLinearHead,
heads/latent_pred_head.py LatentMultiPredictContrastHead, utils/optimizers.py LARS,
hooks/byol_hook.py), built from configs/selfsup/MCL/MCL.py with a small backbone and image.

Smaller than the config in two places, both on the official side as its own arguments allow: the
montage side is 32 px instead of 224 (--image-size, a multiple of 32), so the region head's window
(the neck's avg_size) is 1 x 1 instead of 7 x 7 (every tile still covers exactly one window of its FPN map), and the per-process
batch is 32 (montages [32, 8, 2, 1] as the config's [B, B/4, B/16, B/32]).

The official training loop is mmcv's Runner; rebuilt here in its steps: parse_losses (the sum of
every "loss" entry), DistOptimizerHook (backward, clip_grad_norm_ at max_norm 500 over the
parameters with a gradient, step, zero_grad), BYOLHook (the momentum set before the iteration from
runner.iter / max_iters, the EMA after it), LARS with build_optimizer's paramwise options (its
function from apis/train.py, run here on its own). The lr is held constant over the steps compared
(mmcv's lr hooks are mmcv's code, not MCL's). The montage slot permutations the official
model draws (torch.randperm, branch 1 and 2 alternating per ratio) are recorded and replayed in
mcl.py's order (all ratios of branch 1, then branch 2).
"""
import ast
import re
import sys
import types

import torch
import torch.distributed as dist
import torch.nn as nn

from official import (cpu_cuda, from_rank0, import_file, import_project, is_bn_statistic, load_mapped,
                      mapped_grads)
from stand_ins import import_openselfsup

BATCH_PER_RANK = 32
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def online_key(k):
    """Official nn.Sequential(ResNet, FPN, DetConvGpNonLinearHead) key -> mcl.Online key."""
    part, rest = k.split(".", 1)
    if part == "0":
        return "encoder." + rest
    if part == "1":
        m = re.fullmatch(r"(lateral|fpn)_convs\.(\d)\.(conv|bn)\.(.+)", rest)
        which = "0" if m[3] == "conv" else "1"
        if m[1] == "lateral":
            return f"fpn.lateral.{m[2]}.{which}.{m[4]}"
        return f"fpn.output.p{int(m[2]) + 2}.{which}.{m[4]}"
    m = re.fullmatch(r"cls_convs\.(\d)\.(conv|bn)\.(.+)", rest)
    if m:
        return f"head.convs.{3 * int(m[1]) + (0 if m[2] == 'conv' else 1)}.{m[3]}"
    m = re.fullmatch(r"mlp\.(\d)\.(.+)", rest)
    return f"head.last_bn.{m[2]}" if m[1] == "4" else f"head.mlp.{m[1]}.{m[2]}"


def model_key(k):
    """Official MCL key -> key in mcl.py's {student, target} (None: dropped)."""
    if k.startswith("backbone."):
        return None  # MCL.backbone is encoder_q[0] again
    if k.startswith("encoder_q."):
        return "student.online." + online_key(k[len("encoder_q."):])
    if k.startswith("encoder_k."):
        return "target." + online_key(k[len("encoder_k."):])
    m = re.fullmatch(r"head\.predictor\.(\d)\.mlp\.(\d)\.(.+)", k)
    return f"student.predictors.{m[1]}.{m[2]}.{m[3]}"


def official_build_optimizer(path, optimizers, notes):
    """apis/train.py's build_optimizer, taken out of that file (which imports mmcv's runner and
    OpenSelfSup's datasets and hooks) and run with the names it uses."""
    source = (path / "openselfsup" / "apis" / "train.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "build_optimizer")
    namespace = {"re": re, "dist": dist, "optimizers": optimizers, "print_log": lambda *a, **k: None,
                 "obj_from_dict": None}
    exec(compile(ast.Module([fn], []), str(path / "openselfsup/apis/train.py"), "exec"), namespace)
    notes.add("apis/train.py build_optimizer: the official function alone (its module imports mmcv's runner)")
    return namespace["build_optimizer"]


def views(step, rank, size):
    """8 crops per image: 0-3 branch 1, 4-7 branch 2 (the config's img_pyramid_pipe_idxs)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(BATCH_PER_RANK, 3, size, size, generator=g) for _ in range(8)]


def check(path, cli, table, notes):
    arch, size = cli.arch or "resnet18", cli.image_size or 32
    if size % 32:
        raise SystemExit(f"mcl: --image-size {size} must be a multiple of 32 (the neck's window is size / 32)")
    world, rank = dist.get_world_size(), dist.get_rank()
    official = import_openselfsup(path, ["mcl"], notes)
    builder = __import__("openselfsup.models.builder", fromlist=["build_model"])
    optimizers = import_file(path / "openselfsup" / "utils" / "optimizers.py", "official_mcl_optimizers")
    mcl, common = import_project("mcl"), import_project("common")
    steps = cli.steps
    args = mcl.get_args(["--arch", arch, "--image-size", str(size), "--batch-size", str(BATCH_PER_RANK * world),
                         "--epochs", "2", "--lr", "8.0", "--base-momentum", "0.9", "--amp", "fp32"])
    notes.add(f"{arch}, {size}-px crops and montages, {BATCH_PER_RANK} images per process (montages {args.montages}), "
              f"region-head window {size // 32} x {size // 32}; LARS lr {args.scaled_lr:g} constant, wd {args.weight_decay}, clip 500; "
              f"target momentum 0.9 -> 1 over 2 epochs of {steps} steps")

    channels = [64, 128, 256, 512] if arch in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    B = BATCH_PER_RANK
    cfg = dict(type="MCL", pretrained=None, base_momentum=args.base_momentum,
               backbone=dict(type="ResNet", depth=DEPTHS[arch], in_channels=3, out_indices=[1, 2, 3, 4],
                             norm_cfg=dict(type="BN")),
               neck=dict(type="DetConvGpNonLinearHead", in_channels=256, hid_channels=2048, out_channels=256,
                         avg_size=size // 32, stacked_convs=4, norm_cfg=dict(type="BN"), mlp_bn=True, last_bn=True),
               head=dict(type="LatentMultiPredictContrastHead",
                         predictor=dict(type="NonLinearNeckV2", in_channels=256, hid_channels=2048, out_channels=256,
                                        with_avg_pool=False), T=1.0, head_num=4),
               train_cfg=dict(downsample_ratios=[1, 2, 4, 8], batch_sizes=[B, B // 4, B // 16, B // 32],
                              loss_weight=[1. / 2, 1. / 4, 1. / 8, 1. / 8], img_pyramid_pipe_idxs_1=[0, 1, 2, 3],
                              img_pyramid_pipe_idxs_2=[4, 5, 6, 7],
                              fpn_cfg=dict(type="FPN", in_channels=channels, out_channels=256,
                                           norm_cfg=dict(type="BN", requires_grad=True), start_level=0, num_outs=4)))
    torch.manual_seed(0)
    ref = builder.build_model(cfg)
    assert type(ref) is official["mcl"].MCL
    ref_ddp = nn.parallel.DistributedDataParallel(ref, broadcast_buffers=False)  # OpenSelfSup's dist train
    build_optimizer = official_build_optimizer(path, optimizers, notes)
    ref_opt = build_optimizer(ref_ddp, dict(type="LARS", lr=args.scaled_lr, weight_decay=args.weight_decay, momentum=0.9,
                                            paramwise_options={
                                                r"(bn|gn)(\d+)?.(weight|bias)": dict(weight_decay=0., lars_exclude=True),
                                                "bias": dict(weight_decay=0., lars_exclude=True)}))

    # BYOLHook, with the mmcv names it imports (Hook.every_n_iters, is_module_wrapper) and a runner of its fields.
    runner_mod = sys.modules["mmcv.runner"]
    runner_mod.Hook = type("Hook", (), {"every_n_iters": lambda self, runner, n: (runner.iter + 1) % n == 0 if n > 0
                                        else False})
    sys.modules["mmcv.parallel"].is_module_wrapper = lambda m: isinstance(m, nn.parallel.DistributedDataParallel)
    hooks = types.ModuleType("openselfsup.hooks")
    hooks.__path__ = [str(path / "openselfsup" / "hooks")]
    sys.modules["openselfsup.hooks"] = hooks
    hook = __import__("openselfsup.hooks.byol_hook", fromlist=["BYOLHook"]).BYOLHook(end_momentum=1., update_interval=1)
    runner = types.SimpleNamespace(iter=0, max_iters=2 * steps, model=ref_ddp)
    notes.add("hooks/byol_hook.py: the official hook, with stand-ins for mmcv.runner.Hook.every_n_iters and "
              "mmcv.parallel.is_module_wrapper, driven by a runner holding iter / max_iters / model")

    # mcl.py's networks, as mcl.main builds them, with the official weights.
    student = mcl.Student(arch)
    target = mcl.Online(arch).requires_grad_(False)
    mine = nn.ModuleDict({"student": student, "target": target})
    load_mapped(mine, ref.state_dict(), model_key)

    optimizer = common.LARS(mcl.official_param_groups(student), lr=args.scaled_lr, weight_decay=args.weight_decay,
                            form="openselfsup")
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    level_weights = torch.tensor(args.level_weights)
    m_schedule = common.momentum_schedule(args.base_momentum, 2, steps)

    for step in range(steps):
        crops = views(step, rank, size)
        runner.iter = step
        hook.before_train_iter(runner)
        table.add(f"step {step + 1}: target momentum", torch.tensor(ref.momentum), torch.tensor(m_schedule[step]))
        perms, randperm = [], torch.randperm

        def recording_randperm(*a, **k):
            perms.append(randperm(*a, **k))
            return perms[-1]

        torch.randperm = recording_randperm
        try:
            with cpu_cuda(notes):
                losses = ref_ddp(img=torch.stack(crops, 1).clone(), mode="train")
        finally:
            torch.randperm = randperm
        ref_loss = sum(v for k, v in losses.items() if "loss" in k)  # parse_losses
        ref_loss.backward()
        nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad and p.grad is not None], max_norm=500,
                                 norm_type=2)  # DistOptimizerHook.clip_grads
        ref_opt.step()
        grads = mapped_grads(ref.named_parameters(), model_key)
        ref_opt.zero_grad()
        hook.after_train_iter(runner)

        replay = perms[0::2] + perms[1::2]  # official: (branch 1, branch 2) per ratio; mcl.py: branch 1's ratios first

        def replayed_randperm(n, *a, **k):
            perm = replay.pop(0)
            assert perm.numel() == n, "montage permutations out of order"
            return perm.clone()

        torch.randperm = replayed_randperm
        try:
            state = mcl.State(model, target, student.online, level_weights, optimizer,
                              torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
            loss = mcl.train_step([c.clone() for c in crops], state, m_schedule[step], args)
        finally:
            torch.randperm = randperm
        table.add(f"step {step + 1}: loss", ref_loss.detach(), loss[0])
        for level in range(4):
            table.add(f"step {step + 1}: loss of ratio {2 ** level}",
                      losses[f"loss_q_level_{level}"].detach() + losses[f"loss_k_level_{level}"].detach(),
                      loss[1 + level] * level_weights[level])
        table.add(f"step {step + 1}: gradients (clipped)", grads,
                  {f"student.{n}": p.grad for n, p in student.named_parameters() if p.grad is not None})
    notes.add(f"montage permutations: {len(perms)} per step drawn by the official model, replayed in mcl.py")

    ref_state = {model_key(k): v for k, v in ref.state_dict().items() if model_key(k) is not None}
    my_state = mine.state_dict()
    pick = lambda s, prefix, stats: {k: v.double() for k, v in s.items() if k.startswith(prefix) and
                                     is_bn_statistic(k) == stats}
    after = f"after {steps}:"
    table.add(f"{after} online network and predictors", pick(ref_state, "student.", False), pick(my_state, "student.", False))
    table.add(f"{after} target (EMA)", pick(ref_state, "target.", False), pick(my_state, "target.", False))
    for prefix, name in (("student.online.encoder.", "online ResNet"), ("student.online.fpn.", "online FPN"),
                         ("student.online.head.", "online region head"), ("student.predictors.", "predictors"),
                         ("target.encoder.", "target ResNet"), ("target.fpn.lateral.3", "target FPN P5 lateral"),
                         ("target.fpn.output.p5", "target FPN P5 output"), ("target.fpn.lateral.0", "target FPN P2 lateral"),
                         ("target.fpn.output.p2", "target FPN P2 output"), ("target.head.", "target region head")):
        table.add(f"{after} {name} BN statistics (rank 0)", from_rank0(pick(ref_state, prefix, True)),
                  from_rank0(pick(my_state, prefix, True)))
