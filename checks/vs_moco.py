"""moco.py against facebookresearch/moco's moco/builder.py (MoCo v2 = builder.MoCo(..., mlp=True) at T = 0.2).

The official training loop (main_moco.py: DDP over the whole MoCo module, nn.CrossEntropyLoss,
SGD over model.parameters()) is rebuilt here in a few lines around the official module; main_moco.py
itself needs ImageNet folders and CUDA. Under a process group of W gloo processes the method file
takes its DDP path (shuffle BN across processes), as the official code; with W = 1 it is run with
--bn-splits 1 (one BatchNorm over the batch, no shuffle), which equals the official shuffle within
one process up to the order of BatchNorm's sums.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

from official import cpu_cuda, from_rank0, import_file, import_project, load_mapped, mapped_grads

BATCH_PER_RANK, QUEUE, DIM = 4, 16, 128


def encoder_key(k):
    """Official encoder (torchvision ResNet whose fc became Sequential(Linear, ReLU, fc)) -> moco.Encoder."""
    if k.startswith("fc.0."):
        return "head.0." + k[5:]
    if k.startswith("fc.2."):
        return "head.2." + k[5:]
    return "backbone." + k


def model_key(k):
    """Official MoCo module key -> the key in the method file's {encoder_q, encoder_k, queue}."""
    for part in ("encoder_q.", "encoder_k."):
        if k.startswith(part):
            return part + encoder_key(k[len(part):])
    return {"queue": "queue.keys", "queue_ptr": "queue.ptr"}[k]


def views(step, rank, size):
    """The two views of this rank's batch at `step`: the same tensors go to both implementations."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return tuple(torch.randn(BATCH_PER_RANK, 3, size, size, generator=g) for _ in range(2))


def check(path, cli, table, notes):
    arch, size = cli.arch or "resnet18", cli.image_size or 64
    world, rank = dist.get_world_size(), dist.get_rank()
    builder = import_file(path / "moco" / "builder.py", "official_moco_builder")
    moco = import_project("moco")
    args = moco.get_args(["--arch", arch, "--image-size", str(size), "--batch-size", str(BATCH_PER_RANK * world),
                          "--queue-size", str(QUEUE), "--dim", str(DIM), "--bn-splits", "1", "--lr", "0.5",
                          "--momentum", "0.9", "--amp", "fp32"])
    notes.add(f"{arch} at {size} px, {BATCH_PER_RANK} images per process, queue {QUEUE}, key EMA m 0.9, SGD lr 0.5 "
              f"(large, so that a wrong step shows); T {args.temperature}, momentum 0.9, wd {args.weight_decay}")

    # Official model, as main_moco.py builds it (MoCo v2 flags: --mlp --moco-t 0.2).
    torch.manual_seed(0)
    ref = builder.MoCo(torchvision.models.__dict__[arch], DIM, QUEUE, args.momentum, args.temperature, mlp=True)
    ref_ddp = nn.parallel.DistributedDataParallel(ref)
    ref_opt = torch.optim.SGD(ref_ddp.parameters(), args.lr, momentum=args.sgd_momentum,
                              weight_decay=args.weight_decay)
    criterion = nn.CrossEntropyLoss()

    # The method file's model, as moco.main builds it, then the official weights and queue copied in.
    encoder_q = moco.Encoder(arch, DIM)
    encoder_k = moco.Encoder(arch, DIM).requires_grad_(False)
    queue = moco.Queue(DIM, QUEUE)
    mine = nn.ModuleDict({"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue})
    state = dict(ref.state_dict())
    state["queue_ptr"] = state["queue_ptr"].view(())  # official (1,), mine () : the same pointer
    load_mapped(mine, state, model_key)
    params_q = list(encoder_q.parameters())
    optimizer = torch.optim.SGD(params_q, lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay,
                                foreach=True)
    model_q = nn.parallel.DistributedDataParallel(encoder_q) if world > 1 else encoder_q
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    for step in range(1, cli.steps + 1):
        im_q, im_k = views(step, rank, size)
        torch.manual_seed(step)  # the shuffle-BN permutation: rank 0's draw, broadcast, on both sides
        with cpu_cuda(notes):
            logits, labels = ref_ddp(im_q=im_q.clone(), im_k=im_k.clone())
        ref_loss = criterion(logits, labels)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        torch.manual_seed(step)
        state = moco.State(model_q, encoder_k, queue, optimizer, scaler, None, torch.device("cpu"))
        loss = moco.train_step((im_q.clone(), im_k.clone()), state, args)
        table.add(f"step {step}: loss", ref_loss.detach(), loss)
        table.add(f"step {step}: gradients", mapped_grads(ref.named_parameters(), model_key),
                  {f"encoder_q.{n}": p.grad for n, p in encoder_q.named_parameters()})

    ref_state = {model_key(k): v for k, v in ref.state_dict().items()}
    ref_state["queue.ptr"] = ref_state["queue.ptr"].view(())
    my_state = mine.state_dict()
    part = lambda s, prefix, buffers: {k: v.float() for k, v in s.items() if k.startswith(prefix)
                                       and (("running_" in k or "num_batches" in k) == buffers)}
    table.add(f"after {cli.steps}: query encoder weights", part(ref_state, "encoder_q.", False),
              part(my_state, "encoder_q.", False))
    table.add(f"after {cli.steps}: query encoder BN statistics", part(ref_state, "encoder_q.", True),
              part(my_state, "encoder_q.", True))
    table.add(f"after {cli.steps}: key encoder (EMA) weights", part(ref_state, "encoder_k.", False),
              part(my_state, "encoder_k.", False))
    # The official DDP wraps the whole MoCo module, so it re-broadcasts rank 0's key-encoder BatchNorm
    # statistics at every forward; moco.py's DDP wraps the query encoder only. Those statistics are
    # never used (the key encoder always runs in train mode) and only rank 0 saves: compare rank 0's.
    notes.add("key encoder BN running statistics: rank 0's on both sides (the official DDP over the whole "
              "MoCo module re-broadcasts rank 0's each forward; unused in training, rank 0 saves)")
    table.add(f"after {cli.steps}: key encoder BN statistics (rank 0)",
              from_rank0(part(ref_state, "encoder_k.", True)), from_rank0(part(my_state, "encoder_k.", True)))
    table.add(f"after {cli.steps}: queue", ref_state["queue.keys"], my_state["queue.keys"])
    table.add(f"after {cli.steps}: queue pointer", ref_state["queue.ptr"].float(), my_state["queue.ptr"].float())
