"""`python benchmarks/bench.py memory`: an estimate, made on a CPU, of the memory one training step of
each method needs on a GPU at the paper's per-GPU batch, and the largest batch that fits 24, 40, 80 GB.

For each method (the method file's real train_step, set up by speed.py at ResNet-50 224 px, ViT-S/16
224 px for adclr, fp32, one process) and each of two small batches: one warm-up step (the optimizer's
state appears), then the peak of one more step: the bytes of every tensor alive before it (weights,
teacher, optimizer state, queues, input views) plus the highest point of the CPU allocator's live
bytes during it (torch.profiler's memory events, summed in time order: activations, gradients).
The peak is extrapolated linearly in the batch: peak(B) = fixed + B · per_image.

It is an estimate: a GPU adds the CUDA context (~0.5 GB), the caching allocator's rounding and
cuDNN workspaces, and the default --amp (bf16 autocast) keeps most activations at half the size.
`python benchmarks/bench.py gpu` measures torch.cuda.max_memory_allocated at batch 64 in bf16 and
replaces it.
"""
import gc
import time

import torch

import common
from benchmarks import speed

GB = 1e9
METHODS = (*speed.METHODS, "decon_densecl")
PAPER_BATCH = {  # per GPU, from each method file's docstring (global batch / 8 GPUs)
    "moco": 32, "densecl": 32, "decon": 64, "mcl": 512, "adclr": 128, "decon_densecl": 32,
}
# MCL pastes B/32 montages at ratio 8 (mcl.get_args): its batch is a multiple of 32, and batch 64 did
# not fit the 23 GB of the machine that measured it. It is measured at 32 alone, its fixed part taken
# as the state a step keeps whatever the batch: the tensors alive before it less its input views
# (8 crops), plus one gradient per trained parameter (the other methods print this check too).
ONE_POINT = {"mcl": 32}
INPUT_VIEWS = {"moco": 2, "densecl": 2, "decon": 2, "decon_densecl": 2, "mcl": 8}  # (B, 3, 224, 224) tensors


def live_bytes():
    """The bytes of every tensor the garbage collector can reach, each storage counted once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # objects that only look like tensors
            continue
    return total


def step_peak(step):
    """The highest point of the allocator's live bytes during step(), above where it started."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # the raw allocation events (+bytes, -bytes) in time order; prof.events() folds most into their ops
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def setup_decon_densecl(args, device, dtype):
    """decon_densecl.py's train_step as its main() in one process (speed.py has no setup for it)."""
    import copy
    import decon_densecl as m
    a = m.get_args(["--arch", args.arch, "--image-size", str(args.image_size), "--bn-splits", str(speed._bn_splits(args.batch_size))])
    net_q = common.split_batchnorm(m.Network(a), a.bn_splits).to(device)
    net_k = copy.deepcopy(net_q).requires_grad_(False)
    global_queue = m.Queue(a.dim, a.queue_size).to(device)
    dense_queues = torch.nn.ModuleList(m.Queue(a.dim, a.queue_size) for _ in net_q.heads).to(device)
    opt = torch.optim.SGD(net_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    views = speed._views(2, args.batch_size, args.image_size, device)
    state = m.State(net_q, net_k, global_queue, dense_queues, m.head_weights(a, len(net_q.heads)), opt, scaler, dtype, device)
    return (lambda: m.train_step(views, state, a),)


def measure(method, batch, args):
    """Peak bytes of one fp32 step of `method` at `batch` (after one warm-up step)."""
    import argparse
    a = argparse.Namespace(arch=args.arch, vit=args.vit, image_size=224, batch_size=batch, compile=False, extra={})
    torch.manual_seed(0)
    setup = setup_decon_densecl if method == "decon_densecl" else getattr(speed, f"setup_{method}")
    step = setup(a, torch.device("cpu"), None)[0]  # the floor's networks are dropped
    gc.collect()
    step()
    gc.collect()
    before = live_bytes()
    grads = sum(p.nbytes for p in gc.get_objects() if isinstance(p, torch.nn.Parameter) and p.requires_grad)
    state = before - INPUT_VIEWS.get(method, 0) * batch * 3 * 224 * 224 * 4 + grads
    return before + step_peak(step), state


def memory(args):
    t0 = time.perf_counter()
    rows = []
    for method in args.methods:
        if method in ONE_POINT:
            b1 = b2 = ONE_POINT[method]
            (p1, fixed), p2 = measure(method, b1, args), None
            per_image = (p1 - fixed) / b1
        else:
            b1, b2 = args.batches
            (p1, _), (p2, state) = measure(method, b1, args), measure(method, b2, args)
            per_image = (p2 - p1) / (b2 - b1)
            fixed = p1 - b1 * per_image
            if method in INPUT_VIEWS:
                print(f"memory | {method}: fixed part {fixed / GB:.2f} GB by the fit, {state / GB:.2f} GB by the kept state")
        fits = {gb: max(int((gb * GB - fixed) // per_image), 0) for gb in (24, 40, 80)}
        rows.append(dict(method=method, encoder=args.vit if method == "adclr" else args.arch, batches=(b1, b2),
                         peaks_gb=(p1 / GB, p2 / GB if p2 else None), fixed_gb=fixed / GB, per_image_gb=per_image / GB,
                         paper_batch=PAPER_BATCH[method], at_paper_gb=(fixed + PAPER_BATCH[method] * per_image) / GB,
                         fits=fits))
        print(f"memory | {method}: {p1 / GB:.2f} GB at batch {b1}" + (f", {p2 / GB:.2f} GB at {b2}" if p2 else ""), flush=True)
    print(f"\nEstimate of one fp32 training step's peak memory, measured on the CPU ({torch.get_num_threads()} threads, "
          f"torch {torch.__version__}) at two batches and extrapolated linearly; {time.perf_counter() - t0:.0f} s\n")
    print("| method | encoder | measured (batch: GB) | fixed GB | GB per image | paper batch/GPU | GB at it | "
          "batch that fits 24 / 40 / 80 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        (b1, b2), (p1, p2) = r["batches"], r["peaks_gb"]
        measured = f"{b1}: {p1:.2f}" + (f", {b2}: {p2:.2f}" if p2 else " (one point)")
        print(f"| {r['method']} | {r['encoder']} | {measured} | {r['fixed_gb']:.2f} | "
              f"{r['per_image_gb']:.3f} | {r['paper_batch']} | {r['at_paper_gb']:.1f} | "
              f"{r['fits'][24]} / {r['fits'][40]} / {r['fits'][80]} |")
    return rows
