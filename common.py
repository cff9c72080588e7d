"""Shared plumbing for the method files: distributed helpers, loaders, schedules, LARS, mixed
precision, arguments, logging, checkpoints and resume. Images (synthetic scenes, --data presets,
augmentations) are in imagedata.py, networks (ResNet trunk, FPN, ViT) in backbones.py.

Nothing here is a method: queues, momentum updates, matching and losses live in the method files,
so that each one can be read on its own (and copied, with common.py, imagedata.py and backbones.py).
"""
import functools
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm


# =================================================================================================
# Distributed (torchrun) helpers
# =================================================================================================
def init_distributed():
    """Join the torchrun process group if RANK/WORLD_SIZE are set; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        # the ranks agree on stop signals every step over this CPU group: no GPU synchronisation
        _RUN["cpu_group"] = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return rank, world, device


def is_main():
    """True on rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x):
    """Concatenate `x` (B, ...) from all ranks along dim 0 -> (world*B, ...); no gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sync_batchnorm(model, enabled):
    """Convert BatchNorm to SyncBatchNorm when `enabled` under DDP on CUDA (PyTorch has no CPU SyncBN)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if enabled and world_size() > 1 and torch.cuda.is_available() else model


def add_bn_splits_arg(parser):
    """--bn-splits, for the methods with shuffle BN (MoCo v2, DenseCL, DeCon over DenseCL)."""
    parser.add_argument("--bn-splits", type=int, default=8,
                        help="one process only: shuffle BN emulated with this many groups of the batch, each with its "
                             "own BatchNorm statistics, the key batch shuffled across them (as the official MoCo Colab "
                             "demo; 8 = the papers' 8 GPUs); 1 = one BatchNorm over the whole batch, no shuffle. Under "
                             "torchrun every process is one group, shuffled across processes (the official shuffle BN)")


def check_bn_splits(parser, args):
    """In one process the batch must split into --bn-splits groups of at least 2 images (after
    split_batch; check_args has refused --bn-splits < 1)."""
    b = args.batch_size
    if args.world_size == 1 and (b % args.bn_splits or b // args.bn_splits < 2):
        fit = max([g for g in range(1, 9) if b % g == 0 and b // g >= 2], default=1)
        parser.error(f"--batch-size {b} does not split into --bn-splits {args.bn_splits} BatchNorm groups of at least "
                     f"2 images each: pick a --bn-splits that divides the batch with 2+ images per group (e.g. "
                     f"--bn-splits {fit}: {b // fit} images each), or 1 for one BatchNorm over the batch (no shuffle BN)")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` groups of the batch taken apart, as
    `splits` processes would each compute them: one process emulates shuffle BN's per-GPU BatchNorm
    (MoCo's official Colab demo, colab/moco_cifar10_demo.ipynb, does the same with bn_splits 8).
    Group g is the g-th of `splits` equal consecutive slices of the batch: views in any memory format
    (the demo's reshape to (N/G, G*C) copies a channels_last batch, and was slower on a CPU too).
    The running statistics move by the mean of the groups' statistics. Same parameters and buffers
    as nn.BatchNorm2d, so checkpoints are interchangeable; in eval mode it is nn.BatchNorm2d."""

    def __init__(self, num_features, splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x):  # (N, C, H, W), N a multiple of splits
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        stats = [(self.running_mean.clone(), self.running_var.clone()) for _ in range(self.splits)]  # one per group
        y = torch.cat([nn.functional.batch_norm(part, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
                       for part, (mean, var) in zip(x.chunk(self.splits), stats)])  # (N, C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack([mean for mean, _ in stats]).mean(0))
            self.running_var.copy_(torch.stack([var for _, var in stats]).mean(0))
        return y


def split_batchnorm(module, splits):
    """Replace every nn.BatchNorm2d in `module` by a SplitBatchNorm2d with the same state (call it before
    moving `module` to its device); returns `module`. Every one must track running statistics with a
    fixed momentum (PyTorch's default), as every BatchNorm of the networks here does."""
    if splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if not child.track_running_stats or child.momentum is None:
                raise ValueError(f"{name}: split BatchNorm needs running statistics with a fixed momentum")
            split = SplitBatchNorm2d(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, splits)
    return module


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (after `skip` of this rank's samples) and
    yields (epoch, index) pairs, so that SeededSamples can make each sample's randomness depend on
    (seed, rank, epoch, index) alone."""

    skip = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return super().__len__() - self.skip


class SeededSamples(Dataset):
    """dataset[(epoch, i)]: sample i with Python, NumPy and torch seeded from (seed, rank, epoch, i)
    while its augmentations are drawn, then the previous RNG states restored. A resumed run, any
    number of loader workers and an uninterrupted run therefore see bit-identical views, and the
    training step's own random draws do not depend on the loader."""

    def __init__(self, dataset, seed, rank):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = int(np.random.SeedSequence([self.seed, self.rank, epoch, i]).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        try:
            return self.dataset[i]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def split_batch(parser, args):
    """Set args.world_size (from torchrun) and args.batch_per_rank; --batch-size is the global batch."""
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % args.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {args.world_size} processes")
    args.batch_per_rank = args.batch_size // args.world_size


def make_loader(dataset, batch_size, workers, seed, device, collate_fn=None):
    """Training DataLoader: per-rank batches, shuffled by epoch, last partial batch dropped; every
    sample's augmentation seeded from (seed, rank, epoch, index) (SeededSamples). The loader draws
    its own base seed from a private generator, not from the global RNG the checkpoint restores."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = ResumableSampler(dataset, num_replicas=world_size(), rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(SeededSamples(dataset, seed, rank), batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed + rank))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images are fewer than one global batch of {batch_size * world_size()}: "
                         f"lower --batch-size or use more data (--synthetic-len)")
    return loader


# =================================================================================================
# Schedules, optimiser, precision, seeding
# =================================================================================================
def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0, per_step=True):
    """Per-step values: linear warm-up, then cosine from `base` to `final` (per step or per epoch)."""
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    steps = np.arange(total - warmup) if per_step else np.arange(total - warmup) // steps_per_epoch * steps_per_epoch
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(total - warmup, 1)))
    return np.concatenate([np.linspace(warmup_start, base, warmup, endpoint=False), decay]).tolist()


def momentum_schedule(base, epochs, steps_per_epoch):
    """Per-step EMA momentum, cosine from `base` to 1 (BYOL): 1 - (1 - base)(cos(pi k / K) + 1) / 2."""
    return cosine_schedule(base, 1.0, epochs, steps_per_epoch)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), in the two forms of
    the official codes. Groups with lars_exclude=True get plain momentum SGD (their weight_decay is
    set by the caller, 0 in both codes).

    form="slotcon" (SlotCon's utils/lars.py, from Barlow Twins): d = g + wd·w, trust
        q = eta·|w| / |d|; mu = m·mu + q·d; w -= lr·mu (the lr multiplies the buffer).
    form="openselfsup" (MCL's openselfsup/utils/optimizers.py): trust q = eta·|w| / (|g| + wd·|w|);
        mu = m·mu + lr·q·(g + wd·w); w -= mu (the lr is inside the buffer, so a schedule reaches the
        step through the momentum). A zero norm gives q = 1 in both (the MCL code would divide 0 by 0).
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001, form="slotcon"):
        if form not in ("slotcon", "openselfsup"):
            raise ValueError(f"LARS form {form}: expected slotcon or openselfsup")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))
        self.form = form

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm = torch.norm(p)
                    denom = torch.norm(d) if self.form == "slotcon" else torch.norm(p.grad) + g["weight_decay"] * w_norm
                    q = torch.where((w_norm > 0) & (denom > 0), g["eta"] * w_norm / denom, torch.ones_like(w_norm))
                    d = d.mul(q)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                if self.form == "slotcon":
                    buf.mul_(g["momentum"]).add_(d)
                    p.add_(buf, alpha=-g["lr"])
                else:
                    buf.mul_(g["momentum"]).add_(d, alpha=g["lr"])
                    p.sub_(buf)


def lars_param_groups(model):
    """Two groups: weights (decay + LARS) and biases/norm parameters (excluded), as BYOL."""
    decay, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": excluded, "lars_exclude": True, "weight_decay": 0.0}]


def amp_dtype(amp, device):
    """The autocast dtype for --amp (auto: bf16 on CUDA, none on CPU) or None for fp32."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def autocast(device, dtype):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def fp32(fn):
    """Decorator for losses and matching: autocast off and floating tensor arguments cast to fp32, so
    that the value is the fp32 one even when the call sits inside an autocast region (under bf16
    autocast a matmul of logits over 65536 keys moves a loss by about 1e-2)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        cast = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x
        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return run


def seed_everything(seed):
    """Seed Python, NumPy and torch (each rank should pass seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_run_args(parser, epochs, batch_size, epochs_help=None):
    """Flags shared by every training loop: schedule length, batch, precision, logging, output."""
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help or f"training epochs (paper: {epochs})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"global batch over all processes (paper: {batch_size})")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="mixed precision: auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA; slower start)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20, help="steps between logged losses (a host sync)")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (also every epoch)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps in total (0: write the initial weights only)")
    parser.add_argument("--allow-arg-changes", action="store_true",
                        help="resume although arguments that change the result differ from the checkpoint's "
                             "(e.g. a lower --lr after a divergence)")


def check_args(parser, args, positive=(), non_negative=()):
    """Refuse values that would train silently wrong or crash later, with the valid range. Checks
    the shared run flags and the method's own `positive` (> 0) and `non_negative` (>= 0) flags;
    a flag left at None (a derived default) is not checked."""
    positive = ("epochs", "batch_size", "log_every", "save_every", "synthetic_len", *positive)
    non_negative = ("max_steps", "workers", *non_negative)
    for name in positive + non_negative:
        value = getattr(args, name, None)
        if value is not None and (value <= 0 if name in positive else value < 0):
            parser.error(f"--{name.replace('_', '-')} {value}: must be {'> 0' if name in positive else '>= 0'}")


def check_image_size(parser, args, dense):
    """ResNet inputs: at least 32 px (one C5 pixel). Dense losses on a 1 x 1 C5 map (below 64 px)
    compare one location per view: allowed for quick tests, with a warning."""
    if args.image_size < 32:
        parser.error(f"--image-size {args.image_size}: must be >= 32 (the ResNet's stride; 224 in the papers)")
    if dense and args.image_size < 64:
        warnings.warn(f"--image-size {args.image_size} gives a 1 x 1 C5 map: the dense loss sees one location "
                      f"per view (use >= 64 for a spatial map; 224 in the papers)")


# =================================================================================================
# Logging, checkpoints, downstream weights
# =================================================================================================
_RUN = {"stop": 0, "cpu_group": None, "saved": {}}  # signal received, the group to agree on it, last saved steps


def progress(loader, epoch, epochs):
    """tqdm bar over one epoch, shown on rank 0 only."""
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not is_main(), dynamic_ncols=True,
                file=sys.stdout, mininterval=1.0)


def _finite_json(x):
    """JSON has no NaN/Infinity: non-finite floats are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


class JsonLog:
    """Append-only JSON-lines log (rank 0 writes, other ranks ignore); always valid JSON."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, **record):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **{k: _finite_json(v) for k, v in record.items()}}) + "\n")

    def truncate(self, step):
        """Drop the records of steps after `step` (logged after the checkpoint a run resumes from)."""
        if is_main() and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:  # a line a crash cut short
                    pass
            self.path.write_text("".join(l + "\n" for l in keep))


def mean_over_ranks(x):
    """All-reduce mean of a tensor (the logged losses of every rank, at log points only)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def prepare_output(args, script):
    """Create --output-dir and save a copy of the script (rank 0). args.json is written once the
    run has started or resumed (resume), so that a refused resume leaves the stored one intact."""
    out = Path(args.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(script, out / Path(script).name)
    return out


def catch_stop_signals():
    """On SIGINT (Ctrl-C) or SIGTERM (cluster preemption) finish the current step, save, and exit:
    the handler only records the signal; the loop asks stop_requested() after every step. A second
    Ctrl-C stops at once."""
    def handler(signum, frame):
        if _RUN["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _RUN["stop"] = signum
        print0(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint",
               file=sys.stderr)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_requested():
    """The signal number every rank stops on after this step (0: go on). Under torchrun the ranks
    agree by an all-reduce (max) of a CPU scalar, so all of them save the same step."""
    flag = torch.tensor([_RUN["stop"]])
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_RUN["cpu_group"])
    return int(flag)


def exit_on_signal(signum, step, path):
    """After the checkpoint of `step` is saved: say how to resume, exit with 128 + signal number
    (non-zero, so that a scheduler requeues a preempted job)."""
    print0(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}. Rerun the same command "
           f"to resume from it.", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(128 + signum)


def check_finite(losses, modules, step, path, extra=()):
    """Stop the run on every rank if `losses` (the sums since the last check) or any weight, buffer or
    `extra` tensor is not finite: exit status 3 and a message naming the step and the last good
    checkpoint. One host sync, at log and save points only."""
    tensors = [t for m in modules.values() for t in m.state_dict().values() if t.is_floating_point()]
    extra = [t for e in extra for t in (e if isinstance(e, (list, tuple)) else [e])]
    tensors += [t for t in extra if torch.is_tensor(t) and t.is_floating_point()]
    norms = torch.stack(torch._foreach_norm([t.float() for t in tensors])) if tensors else torch.zeros(1)
    ok = (torch.isfinite(norms).all() & torch.isfinite(losses).all()).to(torch.int32).view(1)
    if world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        saved = _RUN["saved"].get(str(path))
        advice = (f"the last good checkpoint is {path} (step {saved}). Rerun with a lower --lr (or --amp fp32) and "
                  f"--allow-arg-changes to resume from it, or start afresh in a new --output-dir" if saved is not None
                  else "no checkpoint was written before it. Rerun with a lower --lr (or --amp fp32)")
        print0(f"\ndiverged: a non-finite loss or weight at step {step} (the check covers every step since the last "
               f"log or save point); nothing is saved from it: {advice}.", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(3)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run; the message says what to do."""


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint (weights_only=True: tensors and plain containers only); an unreadable file
    raises CheckpointError naming it and saying what to do."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # torch's own text for a refused pickle suggests weights_only=False: not advice to pass on
        why = "it holds objects other than tensors and plain containers" if isinstance(e, pickle.UnpicklingError) else (
            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        prev = Path(path).with_name(Path(path).stem + ".prev.pth")
        keep = (f" The previous checkpoint {prev} is kept: `cp {prev} {path}` resumes from it."
                if prev.exists() and Path(path).name == "checkpoint.pth" else "")
        raise CheckpointError(f"cannot read {path} ({why}): it is damaged (a write cut short?) or not a file this "
                              f"project wrote. Move it aside (mv {path} {path}.bad) and rerun.{keep}") from None


def load_state(module, state, what, path):
    """module.load_state_dict(state) with an error that says which run and what to do on mismatch."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"cannot resume {what} from {path}: the checkpoint was made with other settings "
                         f"(arch, heads, queue size). Rerun with the arguments in {Path(path).parent}/args.json, "
                         f"or choose a new --output-dir.\n{e}") from None


def rng_state():
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain containers."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                  *np_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, modules, optimizer, scaler, step, args, extra=None, losses=None):
    """Check that nothing is non-finite (every rank, see check_finite), then save atomically on rank
    0: named modules' state dicts, optimizer, GradScaler, step, args and every rank's RNG states.
    The checkpoint it replaces is kept as checkpoint.prev.pth. A second save of the same step (the
    end of an epoch that also hit --save-every) is skipped, so that .prev stays one save back."""
    if _RUN["saved"].get(str(path)) == step:
        return
    check_finite(losses if losses is not None else torch.zeros(1), modules, step, path, (extra or {}).values())
    rngs = [rng_state()]
    if world_size() > 1:
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, rng_state())
    if is_main():
        path = Path(path)
        if path.exists():
            os.replace(path, path.with_name(path.stem + ".prev.pth"))
        save_atomic({**{k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "args": vars(args), "rng": rngs, **(extra or {})}, path)
    _RUN["saved"][str(path)] = step


# Arguments that cannot change what a run computes: a resume may differ in these.
NEUTRAL_ARGS = {"workers", "log_every", "save_every", "max_steps", "output_dir", "data_root", "compile",
                "allow_arg_changes", "pictures", "export"}


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def resume(path, modules, optimizer, scaler, device, args, log=None):
    """Restore what save_checkpoint wrote, if `path` (or, after a crash between the two renames of a
    save, its .prev.pth) exists; refuse a checkpoint of another script or of other arguments. Writes
    args.json once the run has started or resumed. Returns (step, checkpoint or None)."""
    path = Path(path)
    prev = path.with_name(path.stem + ".prev.pth")
    if is_main():
        for stale in path.parent.glob("*.tmp"):  # left by a write that was killed
            stale.unlink()
    if not path.exists() and prev.exists():
        print0(f"{path} is missing but {prev} exists (a save was cut short): resuming from it")
        path = prev
    ckpt = None
    if path.exists():
        try:
            ckpt = load_checkpoint(path, device)
        except CheckpointError as e:
            raise SystemExit(str(e)) from None
        missing = [k for k in modules if k not in ckpt]
        if not isinstance(ckpt, dict) or missing or "step" not in ckpt:
            raise SystemExit(f"{path} is not a checkpoint of this script: it has no {', '.join(missing) or 'step'} "
                             f"(it holds {', '.join(sorted(ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__}). "
                             f"It was probably written by another method: choose another --output-dir.")
        stored = ckpt.get("args", {})
        changed = {k: (stored[k], v) for k, v in vars(args).items()
                   if k in stored and k not in NEUTRAL_ARGS and _plain(stored[k]) != _plain(v)}
        if changed and not args.allow_arg_changes:
            diff = "; ".join(f"--{k.replace('_', '-')} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            raise SystemExit(f"{path} was made with other arguments: {diff}. Rerun with the checkpoint's arguments "
                             f"({path.parent}/args.json), choose a new --output-dir, or pass --allow-arg-changes.")
        for key, module in modules.items():
            load_state(module, ckpt[key], f"the {key}", path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        if len(ckpt.get("rng", [])) == world_size():
            set_rng_state(ckpt["rng"][rank])
        else:
            warnings.warn(f"{path}: no RNG state for {world_size()} process(es); the resumed run is not bit-identical")
        _RUN["saved"][str(path)] = ckpt["step"]
        if log is not None:
            log.truncate(ckpt["step"])
        print0(f"resumed from {path} at step {ckpt['step']}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    if is_main():
        (path.parent / "args.json").write_text(json.dumps(vars(args), indent=2))
    return (ckpt["step"], ckpt) if ckpt is not None else (0, None)


def save_downstream(path, method, arch, backbone, decoder=None, decoder_cfg=None, extra=None):
    """Write the weights downstream uses (eval_dense.py): a torchvision-named backbone state dict,
    optionally a decoder and its configuration, the architecture and the method's name. Refuses
    non-finite weights (the run's last save_checkpoint has checked them on every rank)."""
    state = {"backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
             "decoder": None if decoder is None else {k: v.detach().cpu() for k, v in decoder.state_dict().items()}}
    if not all(torch.isfinite(v).all() for part in state.values() if part for v in part.values() if v.is_floating_point()):
        raise SystemExit(f"not writing {path}: the weights are not finite")
    save_atomic({"format": "dense-ssl-downstream-v1", "method": method, "arch": arch, **state,
                 "decoder_cfg": decoder_cfg, **(extra or {})}, path)
