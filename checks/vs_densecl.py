"""densecl.py against WXinlong/DenseCL (openselfsup/models/densecl.py, necks.py DenseCLNeck,
heads/contrastive_head.py, backbones/resnet.py), built from the released config
(configs/selfsup/densecl/densecl_coco_800ep.py) with a small backbone, queue and image.

OpenSelfSup's training loop is mmcv's Runner; rebuilt here in its few steps: the model in
MMDistributedDataParallel (broadcast_buffers=False), parse_losses summing the loss terms, SGD over
model.parameters() (build_optimizer without paramwise options), DistOptimizerHook's backward, step,
zero_grad. The official model shuffles keys through torch.distributed: it runs in --world gloo
processes; the method file takes its DDP path there (with one process: --bn-splits 1, which equals
the official single-process shuffle up to the order of BatchNorm's sums).
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from official import cpu_cuda, from_rank0, import_project, load_mapped, mapped_grads
from stand_ins import import_openselfsup

BATCH_PER_RANK, QUEUE, DIM = 4, 16, 128
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def model_key(k):
    """Official DenseCL key -> the method file's {encoder_q, encoder_k, queue, queue2} key (None: dropped)."""
    if k.startswith("backbone."):
        return None  # DenseCL.backbone is encoder_q[0] again
    for part in ("encoder_q.", "encoder_k."):
        if k.startswith(part):
            rest = k[len(part):]
            if rest.startswith("0."):
                return part + "backbone." + rest[2:]
            for official, mine in (("1.mlp.", "head."), ("1.mlp2.", "dense_head.")):
                if rest.startswith(official):
                    return part + mine + rest[len(official):]
            raise KeyError(k)
    return {"queue": "queue.keys", "queue_ptr": "queue.ptr", "queue2": "queue2.keys", "queue2_ptr": "queue2.ptr"}[k]


def views(step, rank, size):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return tuple(torch.randn(BATCH_PER_RANK, 3, size, size, generator=g) for _ in range(2))


def check(path, cli, table, notes):
    arch, size = cli.arch or "resnet18", cli.image_size or 96  # 3 x 3 C5 locations to match
    world, rank = dist.get_world_size(), dist.get_rank()
    official = import_openselfsup(path, ["densecl"], notes)
    builder = __import__("openselfsup.models.builder", fromlist=["build_model"])
    densecl = import_project("densecl")
    args = densecl.get_args(["--arch", arch, "--image-size", str(size), "--batch-size", str(BATCH_PER_RANK * world),
                             "--queue-size", str(QUEUE), "--dim", str(DIM), "--bn-splits", "1", "--lr", "0.5",
                             "--momentum", "0.9", "--amp", "fp32"])
    notes.add(f"{arch} at {size} px ({(size // 32) ** 2} C5 locations), {BATCH_PER_RANK} images per process, queues "
              f"{QUEUE}, key EMA m 0.9, SGD lr 0.5; T {args.temperature}, lambda {args.loss_lambda}")

    # The released config (densecl_coco_800ep.py), with a small backbone, queue and EMA momentum.
    torch.manual_seed(0)
    trunk = densecl.Encoder(arch, DIM).backbone.out_channels
    cfg = dict(type="DenseCL", pretrained=None, queue_len=QUEUE, feat_dim=DIM, momentum=args.momentum,
               loss_lambda=args.loss_lambda,
               backbone=dict(type="ResNet", depth=DEPTHS[arch], in_channels=3, out_indices=[4], norm_cfg=dict(type="BN")),
               neck=dict(type="DenseCLNeck", in_channels=trunk, hid_channels=trunk, out_channels=DIM, num_grid=None),
               head=dict(type="ContrastiveHead", temperature=args.temperature))
    ref = builder.build_model(cfg)
    assert type(ref) is official["densecl"].DenseCL
    ref_ddp = nn.parallel.DistributedDataParallel(ref, broadcast_buffers=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay)

    encoder_q, encoder_k = densecl.Encoder(arch, DIM), densecl.Encoder(arch, DIM).requires_grad_(False)
    queue, queue2 = densecl.Queue(DIM, QUEUE), densecl.Queue(DIM, QUEUE)
    mine = nn.ModuleDict({"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue, "queue2": queue2})
    state = dict(ref.state_dict())
    for k in ("queue_ptr", "queue2_ptr"):
        state[k] = state[k].view(())
    load_mapped(mine, state, model_key)
    params_q = list(encoder_q.parameters())
    optimizer = torch.optim.SGD(params_q, lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay,
                                foreach=True)
    model_q = nn.parallel.DistributedDataParallel(encoder_q) if world > 1 else encoder_q
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    for step in range(1, cli.steps + 1):
        im_q, im_k = views(step, rank, size)
        torch.manual_seed(step)  # the shuffle-BN permutation
        with cpu_cuda(notes):
            losses = ref_ddp(img=torch.stack([im_q, im_k], 1).clone(), mode="train")
        ref_loss = sum(v for k, v in losses.items() if "loss" in k)  # parse_losses
        ref_loss.backward()  # DistOptimizerHook.after_train_iter
        ref_opt.step()
        torch.manual_seed(step)
        state = densecl.State(model_q, encoder_k, queue, queue2, optimizer, scaler, None, torch.device("cpu"))
        loss = densecl.train_step((im_q.clone(), im_k.clone()), state, step - 1 + args.dense_warmup_iters, args)
        grads = mapped_grads(ref.named_parameters(), model_key)
        ref_opt.zero_grad()
        table.add(f"step {step}: loss", ref_loss.detach(), loss[0])
        table.add(f"step {step}: global loss x (1 - lambda)", losses["loss_contra_single"].detach(),
                  loss[1] * (1 - args.loss_lambda))
        table.add(f"step {step}: dense loss x lambda", losses["loss_contra_dense"].detach(), loss[2] * args.loss_lambda)
        table.add(f"step {step}: gradients", grads, {f"encoder_q.{n}": p.grad for n, p in encoder_q.named_parameters()})

    ref_state = {}
    for k, v in ref.state_dict().items():
        if model_key(k) is not None:
            ref_state[model_key(k)] = v.view(()) if k.endswith("_ptr") else v
    my_state = mine.state_dict()
    part = lambda s, prefix, buffers: {k: v.double() for k, v in s.items() if k.startswith(prefix)
                                       and (("running_" in k or "num_batches" in k) == buffers)}
    after = f"after {cli.steps}:"
    table.add(f"{after} query encoder weights", part(ref_state, "encoder_q.", False), part(my_state, "encoder_q.", False))
    notes.add("query encoder BN running statistics: rank 0's on both sides (OpenSelfSup's DDP does not broadcast "
              "buffers, densecl.py's re-broadcasts rank 0's each forward; only rank 0 saves)")
    table.add(f"{after} query encoder BN statistics (rank 0)", from_rank0(part(ref_state, "encoder_q.", True)),
              from_rank0(part(my_state, "encoder_q.", True)))
    table.add(f"{after} key encoder (EMA) weights", part(ref_state, "encoder_k.", False),
              part(my_state, "encoder_k.", False))
    table.add(f"{after} key encoder BN statistics", part(ref_state, "encoder_k.", True), part(my_state, "encoder_k.", True))
    for name in ("queue", "queue2"):
        table.add(f"{after} {name}", ref_state[f"{name}.keys"], my_state[f"{name}.keys"])
        table.add(f"{after} {name} pointer", ref_state[f"{name}.ptr"].double(), my_state[f"{name}.ptr"].double())
