"""The CPU benchmarks behind `python benchmarks/bench.py speed | loss | data`, and the method setups
that benchmarks/gpu.py times on a device.

`speed` times each method's real train_step (from its own file) on random input tensors, interleaved
with the *floor*: the same backbone doing forward+backward on exactly the student's input tensors,
the forward of the teacher's tensors, and a plain SGD step (no heads, no loss, no EMA), which is the
least any such method must compute. The overhead ratio is median(method) / median(floor), measured
in one process so that it holds on a noisy machine. Each method runs in its own subprocess, so that
its peak memory (CUDA max allocated, or CPU peak RSS) is its own.

`loss` times each batched loss against a naive per-sample loop and against its floor: the one
matrix product (or pass over the logits) any implementation must compute. naive / floor is the
most batching can gain on the machine. `data` measures the images/s each method's loader delivers.
"""
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

METHODS = ("moco", "densecl", "decon", "mcl", "adclr")


# =================================================================================================
# speed: one closure per method that runs its real train_step, and the floor
# =================================================================================================
def _extra(args, method):
    """Extra flags for a method's get_args (benchmarks/gpu.py's tiny shapes); none for `speed`."""
    return getattr(args, "extra", {}).get(method, [])


def _bn_splits(batch):
    """The one-process shuffle-BN groups of a user's run (moco/densecl: 8 by default), at most as many
    as leave 4 images per group (2 images' BatchNorm at 1x1 is +-1: bf16 rounding flips its signs)."""
    return max(g for g in range(1, 9) if batch % g == 0 and batch // g >= min(4, batch))


def _views(n, b, size, device):
    return [torch.randn(b, 3, size, size, device=device) for _ in range(n)]


def setup_moco(args, device, dtype):
    import moco
    a = moco.get_args(["--arch", args.arch, "--image-size", str(args.image_size), "--bn-splits",
                      str(_bn_splits(args.batch_size)), *_extra(args, "moco")])
    enc_q = common.split_batchnorm(moco.Encoder(a.arch, a.dim), a.bn_splits).to(device)  # as main() in one process
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    queue = moco.Queue(a.dim, a.queue_size).to(device)
    pq = list(enc_q.parameters())
    opt = torch.optim.SGD(pq, lr=0.03, momentum=0.9, weight_decay=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = _views(2, args.batch_size, args.image_size, device)
    model_q = _prepare(device, args, enc_q, enc_k)
    state = moco.State(model_q, enc_k, queue, opt, scaler, dtype, device)
    step = lambda: moco.train_step(views, state, a)
    nets = (lambda: model_q(_cl(views[0], device)), lambda: enc_k(_cl(views[1], device)), pq)
    return step, views[:1], views[1:], common.ResNetTrunk(args.arch), nets


def setup_densecl(args, device, dtype):
    import densecl
    a = densecl.get_args(["--arch", args.arch, "--image-size", str(args.image_size), "--bn-splits",
                      str(_bn_splits(args.batch_size)), *_extra(args, "densecl")])
    enc_q = common.split_batchnorm(densecl.Encoder(a.arch, a.dim), a.bn_splits).to(device)  # as main() in one process
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    queue, queue2 = densecl.Queue(a.dim, a.queue_size).to(device), densecl.Queue(a.dim, a.queue_size).to(device)
    pq = list(enc_q.parameters())
    opt = torch.optim.SGD(pq, lr=0.03, momentum=0.9, weight_decay=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = _views(2, args.batch_size, args.image_size, device)
    model_q = _prepare(device, args, enc_q, enc_k)
    state = densecl.State(model_q, enc_k, queue, queue2, opt, scaler, dtype, device)
    step = lambda: densecl.train_step(views, state, a.dense_warmup_iters, a)  # past the warm-up: lambda 0.5
    nets = (lambda: model_q(_cl(views[0], device)), lambda: enc_k(_cl(views[1], device)), pq)
    return step, views[:1], views[1:], common.ResNetTrunk(args.arch), nets


def setup_decon(args, device, dtype):
    import decon
    a = decon.get_args(["--arch", args.arch, "--image-size", str(args.image_size), *_extra(args, "decon")])  # DeCon-SL over SlotCon
    student = decon.Network(a).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    predictors = torch.nn.ModuleList(decon.mlp(a.dim_out, a.dim_hidden, a.dim_out, conv=False) for _ in student.heads).to(device)
    centers = [torch.zeros(a.num_prototypes, device=device) for _ in student.heads]
    ps, pt = list(student.parameters()), list(teacher.parameters())
    opt = common.LARS(common.lars_param_groups(torch.nn.ModuleList([student, predictors])), lr=0.1, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = _views(2, args.batch_size, args.image_size, device)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(args.batch_size, 2, 1)  # (B, 2, 4): full overlap
    flips = torch.zeros(args.batch_size, 2, dtype=torch.bool, device=device)
    model_s = _prepare(device, args, student, teacher)
    state = decon.State(model_s, teacher, predictors, centers, decon.head_weights(a, len(student.heads)),
                        decon.group_weights(a, len(student.heads)), opt, scaler, dtype, device)
    step = lambda: decon.train_step((views, boxes, flips), state, 0.99, a)
    x = [_cl(v, device) for v in views]
    nets = (lambda: model_s(*x), lambda: teacher(*x), ps)  # the predictors (an MLP on a few slots) left out
    return step, views, views, common.ResNetTrunk(args.arch), nets


def setup_mcl(args, device, dtype):
    import mcl
    a = mcl.get_args(["--arch", args.arch, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                      *_extra(args, "mcl")])
    student = mcl.Student(a.arch, a.head_windows).to(device)
    target = copy.deepcopy(student.online).requires_grad_(False)
    po, pt = list(student.online.parameters()), list(target.parameters())
    opt = common.LARS(mcl.official_param_groups(student), lr=0.1, weight_decay=1e-5, form="openselfsup")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = _views(8, args.batch_size, args.image_size, device)
    weights = torch.tensor(a.level_weights, device=device)
    model = _prepare(device, args, student, target)
    state = mcl.State(model, target, student.online, weights, opt, scaler, dtype, device)
    step = lambda: mcl.train_step(views, state, 0.99, a)
    (c1, plan, _), (c2, _, _) = mcl.build_montages(views[:4], a.montages, a.tile_resize), mcl.build_montages(views[4:], a.montages, a.tile_resize)
    floor_net = torch.nn.Sequential(common.ResNetTrunk(args.arch, pyramid=True))  # encoder + FPN: MCL's encoder
    floor_net.append(common.FPN(floor_net[0].channels, 256))
    c1, c2 = _cl(c1, device), _cl(c2, device)
    nets = (lambda: model((c1, c2), plan), lambda: [target.forward_p5(c) for c in (c1, c2)], po)
    return step, [c1, c2], [c1, c2], floor_net, nets


def setup_adclr(args, device, dtype):
    import adclr
    a = adclr.get_args(["--arch", args.vit, *_extra(args, "adclr")])
    student = adclr.DINONet(a, drop_path=a.drop_path).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    ps, pt = list(student.parameters()), list(teacher.parameters())
    centers = torch.zeros(2, a.out_dim, device=device)
    opt = torch.optim.AdamW([p for p in ps if p.requires_grad], lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    B = args.batch_size
    globals_, locals_ = _views(2, B, a.global_size, device), _views(a.local_crops, B, a.local_size, device)
    queries = torch.randn(B, a.num_queries, 3, a.patch_size, a.patch_size, device=device)
    sched = {"momentum": 0.996, "teacher_temp": 0.04}
    model_s = torch.compile(student) if getattr(args, "compile", False) else student
    state = adclr.State(model_s, teacher, centers[0], centers[1], opt, scaler, dtype, device)
    step = lambda: adclr.train_step((globals_, locals_, queries), state, 1, sched["momentum"], sched["teacher_temp"], a)
    vit = common.ViT(a.arch, a.patch_size, a.global_size)
    nets = (lambda: model_s(globals_, locals_, queries), lambda: teacher(globals_, (), queries), ps)
    return step, globals_ + locals_, globals_, vit, nets


def _prepare(device, args, student, teacher):
    """As the method files' main(): channels_last on CUDA, the student compiled with --compile."""
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    return torch.compile(student) if getattr(args, "compile", False) else student


def _cl(x, device):
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _mean_of(out):
    """The sum of the means of every floating tensor in a (nested) network output: a loss that
    costs nothing next to the networks and reaches every output."""
    if torch.is_tensor(out):
        return out.float().mean() if out.is_floating_point() else 0
    if isinstance(out, dict):
        out = list(out.values())
    return sum((_mean_of(o) for o in out if o is not None), torch.zeros(()))


def make_networks_floor(nets, device, dtype):
    """The *networks floor*: forward+backward of every network the method trains on its real inputs,
    forward of its teachers, one plain SGD step: no loss, matching, EMA or queue."""
    train_fwd, teacher_fwd, params = nets
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-6, momentum=0.9, foreach=True)

    def step():
        with common.autocast(device, dtype):
            loss = _mean_of(train_fwd()).to(device)
            with torch.no_grad():
                teacher_fwd()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_floor(net, student, teacher, device, dtype):
    """The encoder's fwd+bwd on the student tensors, fwd on the teacher tensors, one SGD step."""
    net = net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step():
        with common.autocast(device, dtype):
            loss = sum(_last(net(x)).float().mean() for x in student)
            with torch.no_grad():
                for x in teacher:
                    net(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _last(out):
    """A tensor from an encoder output (a map, a pyramid list, or ViT tokens)."""
    return out[-1] if isinstance(out, list) else out


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif torch.is_tensor(out):
        out.sum().item()
    return time.perf_counter() - t


def speed_one(args, method):
    """Time `method` and the floor interleaved in this process; return a dict of figures."""
    _, _, device = common.init_distributed()
    dtype = common.amp_dtype(args.amp, device)
    torch.manual_seed(0)
    setups = {"moco": setup_moco, "densecl": setup_densecl, "decon": setup_decon, "mcl": setup_mcl, "adclr": setup_adclr}
    step, student, teacher, encoder, _ = setups[method](args, device, dtype)
    memory_format = torch.channels_last if device.type == "cuda" and method != "adclr" else torch.contiguous_format
    floor = make_floor(encoder, [x.to(memory_format=memory_format) for x in student],
                       [x.to(memory_format=memory_format) for x in teacher], device, dtype)
    for _ in range(args.warmup):
        step(), floor()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_method, t_floor = [], []
    for _ in range(args.steps):
        t_method.append(_timed(step, device))
        t_floor.append(_timed(floor, device))
    m, f = statistics.median(t_method), statistics.median(t_floor)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    return dict(method=method, device=name, arch=args.vit if method == "adclr" else args.arch, image_size=args.image_size, batch=args.batch_size,
                amp=str(dtype), step_s=m, floor_s=f, ratio=m / f, images_per_s=args.batch_size / m, peak_gib=peak)


def speed(args):
    rows = []
    for method in args.methods:
        cmd = [sys.executable, str(Path(__file__).with_name("bench.py")), "speed", "--one", "--methods", method, "--arch", args.arch, "--vit", args.vit,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--amp", args.amp]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{rows[0]['device']}, {args.arch}, {args.image_size} px, batch {args.batch_size}/device, "
          f"{rows[0]['amp']}, median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| method | encoder | step (s) | floor (s) | overhead ratio | images/s | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['arch']} | {r['step_s']:.3f} | {r['floor_s']:.3f} | {r['ratio']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['peak_gib']:.2f} |")
    return rows


# =================================================================================================
# loss: batched vs naive per-sample, at the papers' shapes
# =================================================================================================
def bench_losses(repeats=5):
    """Each batched loss against a naive per-sample loop, and against its floor: the one matrix
    product (or pass over the logits) that any implementation must compute. Median of `repeats`."""
    import densecl
    import moco
    torch.manual_seed(0)
    T, K, D = 0.2, 65536, 128
    rows = []

    def median_time(fn, n):
        out = fn()  # warm-up: the first call pays one-time allocation and library start-up
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    def compare(name, batched, naive, floor=None):
        tb, a = median_time(batched, repeats)
        tn, b = median_time(naive, max(1, repeats // 2))
        tf = median_time(floor, repeats)[0] if floor else None
        rows.append((name, tb, tn, tf, torch.allclose(a, b, rtol=1e-4, atol=1e-4)))

    # MoCo v2: N = 32 queries per GPU (the paper's 256 over 8 GPUs), queue 65536.
    q, k = F.normalize(torch.randn(32, D), dim=1), F.normalize(torch.randn(32, D), dim=1)
    queue = F.normalize(torch.randn(D, K), dim=0)
    logits_buf = torch.empty(32, K)

    def moco_naive():
        losses = []
        for i in range(q.shape[0]):
            logits = torch.cat([(q[i] @ k[i]).view(1), q[i] @ queue]) / T
            losses.append(torch.logsumexp(logits, 0) - logits[0])
        return torch.stack(losses).mean()
    compare("MoCo v2 InfoNCE (N=32, K=65536)", lambda: moco.infonce(q, k, queue, T), moco_naive,
            lambda: torch.mm(q, queue, out=logits_buf))

    # DenseCL: B = 32 per GPU, S² = 49, D = 128, K = 65536, C = 2048 backbone channels.
    B, S2, C = 32, 49, 2048
    qf, kf = F.normalize(torch.randn(B, C, S2), dim=1), F.normalize(torch.randn(B, C, S2), dim=1)
    qg, kg = F.normalize(torch.randn(B, D, S2), dim=1), F.normalize(torch.randn(B, D, S2), dim=1)
    q_flat, chunk_buf = qg.transpose(1, 2).reshape(B * S2, D), torch.empty(B * S2, 4096)

    def densecl_batched():
        return densecl.dense_loss(qg, kg, densecl.match_locations(qf, kf), queue, T)

    def densecl_naive():
        losses = []
        for b in range(B):
            for i in range(S2):
                j = torch.argmax(qf[b, :, i] @ kf[b])
                logits = torch.cat([(qg[b, :, i] @ kg[b, :, j]).view(1), qg[b, :, i] @ queue]) / T
                losses.append(torch.logsumexp(logits, 0) - logits[0])
        return torch.stack(losses).mean()

    def densecl_floor():  # the matching product and the query-queue product, written to a reused buffer
        torch.bmm(qf.transpose(1, 2), kf)
        for c in range(0, K, 4096):
            torch.mm(q_flat, queue[:, c:c + 4096], out=chunk_buf)
    compare("DenseCL dense loss + matching (B=32, S²=49, K=65536)", densecl_batched, densecl_naive, densecl_floor)

    import adclr
    import decon
    import mcl

    # SlotCon/DeCon group loss: B = 64 per GPU (512 / 8), K = 256 prototypes, 7 x 7 maps.
    B, K, h = 64, 256, 7
    gs, gt, center = torch.randn(B, K, h, h), torch.randn(B, K, h, h), torch.randn(1, K) * 0.1

    def group_naive():
        losses = []
        for b in range(B):
            for i in range(h):
                for j in range(h):
                    target = F.softmax((gt[b, :, i, j] - center[0]) / 0.07, 0)
                    losses.append(-(target * F.log_softmax(gs[b, :, i, j] / 0.1, 0)).sum())
        return torch.stack(losses).mean()
    compare("SlotCon group loss (B=64, K=256, 7x7)", lambda: decon.group_loss(gs, gt, center, 0.1, 0.07), group_naive)

    # SlotCon slot loss: B = 64, K = 256, D = 256 (one process).
    zq, zk = torch.randn(B, 256, h, h), torch.randn(B, 256, h, h)
    qs, ks = decon.slots(zq, gs, 0.07), decon.slots(zk, gt, 0.07)
    pred = torch.nn.Identity()

    def slot_naive():
        valid = lambda s: F.one_hot(s.argmax(1), K).flatten(1, 2).amax(1).bool()  # (B, K)
        vq, vk = valid(gs), valid(gt)
        keys = [(b, k) for b in range(B) for k in range(K) if vk[b, k]]
        kv = torch.stack([F.normalize(ks[b, k], dim=0) for b, k in keys])
        index = {key: i for i, key in enumerate(keys)}
        losses = []
        for b in range(B):
            for k in range(K):
                if vq[b, k] and vk[b, k]:
                    logits = kv @ F.normalize(qs[b, k], dim=0) / 0.2
                    losses.append(torch.logsumexp(logits, 0) - logits[index[(b, k)]])
        return torch.stack(losses).mean() * 0.4
    compare("SlotCon slot loss (B=64, K=256, D=256)", lambda: decon.slot_loss(qs, ks, gs, gt, pred, 0.2), slot_naive)

    # MCL level loss: S = 128 tiles per GPU, N = 4096 targets (global batch), D = 256.
    p_ = F.normalize(torch.randn(128, 256), dim=1)
    targets = F.normalize(torch.randn(4096, 256), dim=1)
    labels = torch.randint(0, 4096, (128,))
    mcl_buf = torch.empty(128, 4096)

    def mcl_naive():
        return torch.stack([torch.logsumexp(targets @ p_[i], 0) - targets[labels[i]] @ p_[i] for i in range(128)]).mean() * 2
    compare("MCL level loss (S=128, N=4096, D=256)", lambda: mcl.level_loss(p_, targets, labels, 1.0), mcl_naive,
            lambda: torch.mm(p_, targets.T, out=mcl_buf))

    # DINO loss: V = 12 views (2 global + 10 local), B = 64 per GPU, K = 65536.
    V, Bd, Kd = 12, 64, 65536
    so, to, c = torch.randn(V, Bd, Kd), torch.randn(2, Bd, Kd), torch.zeros(Kd)

    def dino_naive():
        total, n = 0.0, 0
        for iq in range(2):
            for v in range(V):
                if v == iq:
                    continue
                for b in range(Bd):
                    total = total - (F.softmax((to[iq, b] - c) / 0.04, 0) * F.log_softmax(so[v, b] / 0.1, 0)).sum() / Bd
                n += 1
        return total / n
    compare("DINO loss (12 views, B=64, K=65536)", lambda: adclr.dino_loss(so, to, c, 0.1, 0.04), dino_naive,
            lambda: torch.logsumexp(so, -1))  # normalising the student logits: one read and exp of each

    print(f"\nCPU x{torch.get_num_threads()} threads, fp32, median of {repeats} (naive: {max(1, repeats // 2)})\n")
    print("| loss | batched (ms) | naive (ms) | speed-up | floor (ms) | ceiling: naive / floor | equal |")
    print("|---|---|---|---|---|---|---|")
    for name, tb, tn, tf, ok in rows:
        floor = f"{tf * 1e3:.1f} | {tn / tf:.0f}x" if tf else "- | -"
        print(f"| {name} | {tb * 1e3:.1f} | {tn * 1e3:.1f} | {tn / tb:.0f}x | {floor} | {ok} |")
    return rows


# =================================================================================================
# data: does the loader keep up?
# =================================================================================================
def loader_rates(folder, images, image_size, batch, workers, time_left=lambda: math.inf, adclr_args=()):
    """Write `images` synthetic scenes as JPEG files into `folder`, then time each method's view
    pipeline in a DataLoader. Returns [(pipeline, methods, images/s or None when out of time)]."""
    import adclr
    import decon
    import mcl
    for i in range(images):
        common.synthetic_scene(i, size=image_size * 8 // 7)[0].save(f"{folder}/{i:05d}.jpg", quality=90)
    files = common.find_images(folder)
    a = adclr.get_args(["--global-size", str(image_size), *adclr_args])
    pipelines = [("moco / densecl: 2 views", ("moco", "densecl"), common.TwoViews(common.moco_v2_augmentation(image_size))),
                 ("--gpu-augment: decode only", tuple(f"{m} --gpu-augment" for m in METHODS), common.DecodeOnly()),
                 ("decon (slotcon): 2 crops + boxes", ("decon",), decon.TwoCropsWithOverlap(image_size, 0.08)),
                 ("mcl: 8 crops", ("mcl",), mcl.EightCrops(image_size)),
                 ("adclr: 2 + local crops + queries", ("adclr",), adclr.MultiCropWithQueries(a))]
    rows = []
    for name, methods, transform in pipelines:
        if time_left() <= 0:
            rows.append((name, methods, None))
            continue
        collate = common.pad_collate if isinstance(transform, common.DecodeOnly) else None
        loader = torch.utils.data.DataLoader(common.ImageFiles(files, transform), batch_size=batch, num_workers=workers,
                                             shuffle=True, drop_last=True, collate_fn=collate)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t, n = time.perf_counter(), 0
        for _ in it:
            n += batch
        rows.append((name, methods, n / (time.perf_counter() - t) if n else None))
    return rows


def bench_data(args):
    """The loader's images/s per method pipeline, from JPEG files, for each --workers."""
    import tempfile
    print(f"\n{args.images} JPEG files of {args.image_size * 8 // 7} px, batch {args.batch_size}\n")
    print("| pipeline | workers | images/s |")
    print("|---|---|---|")
    for w in args.workers:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:  # the JPEG files go with it
            for name, _, rate in loader_rates(folder, args.images, args.image_size, args.batch_size, w):
                print(f"| {name} | {w} | {rate:.0f} |")
