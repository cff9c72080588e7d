"""`python benchmarks/bench.py gpu`: everything a GPU window can measure, in one command of at most 9 minutes.

    python benchmarks/bench.py gpu                         # on a GPU: writes gpu_report.json and gpu_report.md
    python benchmarks/bench.py gpu --device cpu --tiny     # the CI test that keeps the command from rotting

GPU time comes in short, unannounced windows, so this is prepared to run at once with the torch that
is installed (nothing to download) and to stop each section when its share of `--budget` is spent
(a row then says "skipped (time)"). Sections, in order of value:

1. Correctness on the device. The fused queue InfoNCE (densecl.QueueInfoNCE) equals the plain
   cat + cross-entropy in value and gradient. For every method, from the same initial weights and
   inputs: the first step's loss under bf16 autocast with channels_last equals its fp32 loss within
   `BF16_TOL` (relative); three bf16 steps stay finite and within `STEPS_TOL` of fp32's; the same
   with --compile; one fp16 step with GradScaler is finite.
2. Speed, per method (ResNet-50 224 px, batch 64, bf16; ViT-S/16 for adclr): step time, images/s,
   peak memory and two ratios measured interleaved in one process: over the *encoder floor* (the
   bare encoder's forward+backward on the student's tensors, forward on the teacher's) and over the
   *networks floor* (every network the method trains, forward+backward, its teachers forward, a
   plain SGD step: no loss, matching, EMA or queue). Eager, then --compile. Where a method is above
   1.10x its networks floor, the top operators of a torch.profiler trace say where the time goes.
3. Loader: images/s each method's view pipeline delivers from real JPEG files with `--workers`
   workers, against the images/s its step consumes: "keeps up" or "stalls"; and with --gpu-augment:
   the workers' decode-only rate, capped by the rate of the method's augmentation on the device.

The quality table's GPU tier does not fit in 9 minutes: it is `python benchmarks/bench.py quality --tier gpu`.
"""
import datetime
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from benchmarks import speed

BF16_TOL = 0.02  # relative difference of the first step's loss, bf16 autocast vs fp32
STEPS_TOL = 0.10  # after three steps: the updates differ by bf16 rounding, which SlotCon's sharp
#                   softmaxes amplify (decon at batch 32, 32 px, 3 steps on the 2-core CPU: 6.5e-2;
#                   at --tiny's batch 8 and 2 steps: 1.2e-2, `python benchmarks/bench.py gpu --device cpu --tiny`)
TARGET = 1.10  # the target: step <= 1.10 x the networks floor


def configs(args):
    """The shapes of each part: the real ones, or --tiny's (seconds on a CPU)."""
    if args.tiny:
        return dict(arch="resnet18", vit="vit_micro", image_size=32, batch=8, mcl_batch=32, steps=1, warmup=0, check_steps=2, images=16,
                    workers=0,
                    extra={"adclr": ["--global-size", "32", "--local-size", "16", "--local-crops", "2", "--num-queries",
                                     "4", "--out-dim", "128", "--patch-size", "8"],
                           "decon": ["--dim-hidden", "64", "--dim-out", "32", "--num-prototypes", "16"],
                           "moco": ["--queue-size", "256"], "densecl": ["--queue-size", "256"],
                           "mcl": ["--head-windows", "scored"]})
    return dict(arch="resnet50", vit="vit_small", image_size=224, batch=64, steps=10, warmup=3, check_steps=3, images=1024,
                workers=args.workers, extra={})


class Budget:
    """Wall-clock shares of --budget per section; `left()` is what the current section has."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()


def batch_of(method, cfg):
    return cfg.get("mcl_batch", cfg["batch"]) if method == "mcl" else cfg["batch"]  # MCL: a multiple of 32


def setup(method, cfg, device, dtype, compile=False):
    """speed.py's setup for `method` (the method file's real train_step), at cfg's shapes."""
    import argparse
    a = argparse.Namespace(arch=cfg["arch"], vit=cfg["vit"], image_size=cfg["image_size"], batch_size=batch_of(method, cfg),
                           compile=compile, extra=cfg["extra"])
    torch.manual_seed(0)
    return getattr(speed, f"setup_{method}")(a, device, dtype)


def _loss(out):
    """The total loss from a train_step's return value (a scalar, or a vector whose first entry is the total)."""
    return float(out.float().flatten()[0])


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-8)


# =================================================================================================
# 1. correctness
# =================================================================================================
def check_queue_loss(device):
    """densecl.QueueInfoNCE against densecl.infonce (plain cat + cross-entropy): value and gradient."""
    import densecl
    torch.manual_seed(0)
    M, D, K = 512, 128, 8192
    q = F.normalize(torch.randn(M, D, device=device), dim=1).requires_grad_()
    k = F.normalize(torch.randn(M, D, device=device), dim=1)
    queue = F.normalize(torch.randn(D, K, device=device), dim=0)
    plain = densecl.infonce(q, k, queue, 0.2)
    (g_plain,) = torch.autograd.grad(plain, q)
    fused = densecl.QueueInfoNCE.apply(q, k, queue, 0.2)
    (g_fused,) = torch.autograd.grad(fused, q)
    dv, dg = _rel(float(fused.detach()), float(plain.detach())), float((g_fused - g_plain).norm() / g_plain.norm())
    ok = dv < 1e-5 and dg < 1e-4
    return dict(check="fused queue InfoNCE = plain (value, gradient)", value=f"rel. diff {dv:.1e}, grad {dg:.1e}",
                tolerance="1e-5, 1e-4", ok=ok)


def check_method(method, cfg, device, compile_ok):
    """fp32 vs bf16 (+ channels_last on CUDA), a few steps, --compile, fp16 + GradScaler."""
    rows = []
    runs = {}
    for name, dtype, compiled in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                                  ("bf16 + compile", torch.bfloat16, True), ("fp16 + GradScaler", torch.float16, False)):
        if compiled and not compile_ok:
            continue
        if dtype == torch.float16 and device.type == "cpu" and method not in ("moco", "adclr"):
            continue  # CPU fp16 convolutions are emulated: 37 s per MCL step at --tiny's shapes
        step = setup(method, cfg, device, dtype, compile=compiled)[0]
        runs[name] = [_loss(step()) for _ in range(1 if name.startswith("fp16") else cfg["check_steps"])]
    ref = runs["fp32"]
    for name, losses in runs.items():
        if name == "fp32":
            rows.append(dict(check=f"{method}: fp32 losses", value=" ".join(f"{v:.4f}" for v in losses), tolerance="",
                             ok=all(map(math.isfinite, losses))))
            continue
        finite = all(map(math.isfinite, losses))
        if name.startswith("fp16"):
            rows.append(dict(check=f"{method}: {name}, one step", value=f"{losses[0]:.4f}", tolerance="finite", ok=finite))
            continue
        first, last = _rel(losses[0], ref[0]), max(_rel(a, b) for a, b in zip(losses, ref))
        rows.append(dict(check=f"{method}: {name}, first-step loss vs fp32", value=f"rel. diff {first:.1e}",
                         tolerance=f"{BF16_TOL:g}", ok=finite and first < BF16_TOL))
        rows.append(dict(check=f"{method}: {name}, {len(losses)} steps vs fp32", value=f"max rel. diff {last:.1e}",
                         tolerance=f"{STEPS_TOL:g}", ok=finite and last < STEPS_TOL))
    return rows


def correctness(cfg, device, budget, tiny):
    rows = [check_queue_loss(device)]
    for method in speed.METHODS:
        if budget.left() <= 0:
            rows.append(dict(check=f"{method}: every check", value="skipped (time)", tolerance="", ok=None))
            continue
        rows += check_method(method, cfg, device, compile_ok=not tiny)
    if tiny:
        rows.append(dict(check="every method: bf16 + compile", value="skipped (--tiny: compiling takes minutes on a CPU)",
                         tolerance="", ok=None))
    if device.type == "cpu":
        rows.append(dict(check="densecl, decon, mcl: fp16 + GradScaler", value="skipped (CPU: fp16 convolutions are "
                         "emulated, minutes per step)", tolerance="", ok=None))
    return rows


# =================================================================================================
# 2. speed: the method, the encoder floor and the networks floor, interleaved
# =================================================================================================
def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def speed_row(method, cfg, device, dtype, compiled):
    step, student, teacher, encoder, nets = setup(method, cfg, device, dtype, compile=compiled)
    fmt = torch.channels_last if device.type == "cuda" and method != "adclr" else torch.contiguous_format
    enc_floor = speed.make_floor(encoder, [x.to(memory_format=fmt) for x in student],
                                 [x.to(memory_format=fmt) for x in teacher], device, dtype)
    net_floor = speed.make_networks_floor(nets, device, dtype)
    for _ in range(cfg["warmup"]):
        step(), enc_floor(), net_floor()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {"step": [], "encoder": [], "networks": []}
    for _ in range(cfg["steps"]):
        times["step"].append(_timed(step, device))
        times["encoder"].append(_timed(enc_floor, device))
        times["networks"].append(_timed(net_floor, device))
    m = {k: statistics.median(v) for k, v in times.items()}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    row = dict(method=method, compile=compiled, encoder=cfg["vit"] if method == "adclr" else cfg["arch"],
               batch=batch_of(method, cfg), step_s=m["step"], images_per_s=batch_of(method, cfg) / m["step"], peak_gib=peak,
               encoder_floor_s=m["encoder"], networks_floor_s=m["networks"], over_encoder=m["step"] / m["encoder"],
               over_networks=m["step"] / m["networks"])
    if row["over_networks"] > TARGET and not compiled:  # where the time goes
        row["profile"] = profile(step, device, steps=cfg["steps"])
    return row


def profile(step, device, steps, top=8):
    """The top operators of `steps` steps by self device time (CPU time on a CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(min(steps, 3)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
    total = sum(getattr(e, key, 0) or 0 for e in prof.key_averages()) or 1
    return [f"{e.key}: {100 * (getattr(e, key, 0) or 0) / total:.1f}%" for e in events]


def speed_section(cfg, device, budget, tiny):
    dtype = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    for compiled in (False, True):
        for method in speed.METHODS:
            if budget.left() <= 0 or (compiled and tiny):
                rows.append(dict(method=method, compile=compiled, skipped="time" if not tiny else "--tiny"))
                continue
            rows.append(speed_row(method, cfg, device, dtype, compiled))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# =================================================================================================
# 3. loader
# =================================================================================================
def loader(cfg, device, budget, speed_rows):
    """Images/s from JPEG files per pipeline (speed.loader_rates) against what the step consumes."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-data-") as tmp:  # the JPEG files go with it
        rates = speed.loader_rates(tmp, cfg["images"], cfg["image_size"], cfg["batch"], cfg["workers"], budget.left,
                                   adclr_args=cfg["extra"].get("adclr", []))
    eager = {r["method"]: r for r in speed_rows if not r["compile"] and "skipped" not in r}
    rows = []
    for pipeline, methods, decode_rate in rates:
        for method in methods:
            base, rate, name = method.split()[0], decode_rate, pipeline
            if "--gpu-augment" in method and rate is not None and budget.left() > 0:
                augment = device_augment_rate(base, cfg, device)
                name, rate = f"{pipeline}, then {augment:.0f} images/s of device augmentation", min(rate, augment)
            need = eager[base]["images_per_s"] if base in eager else None
            verdict = None if rate is None or need is None else ("keeps up" if rate >= need else "stalls")
            rows.append(dict(method=method, pipeline=name, workers=cfg["workers"], loader_images_per_s=rate,
                             step_images_per_s=need, verdict=verdict or "not measured"))
    return rows


def device_augment_rate(method, cfg, device, repeats=5):
    """Images/s of the method's --gpu-augment views from a decoded batch, on the device."""
    import adclr
    import decon
    import mcl
    size = cfg["image_size"]
    batch = (torch.randint(0, 256, (batch_of(method, cfg), 3, size * 8 // 7, size * 8 // 7 + 40), dtype=torch.uint8),
             torch.tensor([[size * 8 // 7, size * 8 // 7 + 40]] * batch_of(method, cfg)))
    views = {"moco": lambda: common.MoCoV2Views(size), "densecl": lambda: common.MoCoV2Views(size),
             "decon": lambda: decon.OverlappingViews(size, 0.08),
             "mcl": lambda: mcl.EightCropViews(size),
             "adclr": lambda: adclr.MultiCropViews(adclr.get_args(["--global-size", str(size), *cfg["extra"].get("adclr", [])]))}[method]()
    views(batch, device)  # warm-up
    t = statistics.median(_timed(lambda: views(batch, device), device) for _ in range(repeats))
    return batch_of(method, cfg) / t


# =================================================================================================
# report
# =================================================================================================
def markdown(report):
    f = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    lines = [f"# GPU report: {report['device']}", "",
             f"{report['date']} · torch {report['torch']} · CUDA {report['cuda']} · {report['command']} · "
             f"{report['wall_s']:.0f} s", "", "## Correctness", "", "| check | value | tolerance | ok |", "|---|---|---|---|"]
    for r in report["correctness"]:
        lines.append(f"| {r['check']} | {r['value']} | {r['tolerance']} | {'-' if r['ok'] is None else ('yes' if r['ok'] else 'NO')} |")
    lines += ["", f"## Speed ({report['shapes']})", "",
              "| method | compile | step (s) | images/s | peak (GiB) | encoder floor (s) | x encoder floor | networks floor (s) "
              "| x networks floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["speed"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['compile']} | skipped ({r['skipped']}) | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['compile']} | {f(r['step_s'])} | {f(r['images_per_s'], 0)} | "
                     f"{f(r['peak_gib'], 1)} | {f(r['encoder_floor_s'])} | {f(r['over_encoder'], 2)} | "
                     f"{f(r['networks_floor_s'])} | {f(r['over_networks'], 2)} |")
    for r in report["speed"]:
        if r.get("profile"):
            lines += ["", f"{r['method']} is {r['over_networks']:.2f}x its networks floor; top operators (self time):",
                      *[f"- {p}" for p in r["profile"]]]
    lines += ["", "## Loader", "", "| method | pipeline | workers | loader images/s | step images/s | verdict |",
              "|---|---|---|---|---|---|"]
    for r in report["loader"]:
        lines.append(f"| {r['method']} | {r['pipeline']} | {r['workers']} | {f(r['loader_images_per_s'], 0)} | "
                     f"{f(r['step_images_per_s'], 0)} | {r['verdict']} |")
    lines += ["", "The quality table's GPU tier: `python benchmarks/bench.py quality --tier gpu` (not part of this command)."]
    return "\n".join(lines) + "\n"


def gpu(args):
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/bench.py gpu: no CUDA device; run `python benchmarks/bench.py gpu --device cpu --tiny` to check the command")
    cfg = configs(args)
    # each section runs until its share of --budget is spent: correctness to 30%, speed to 85%, the
    # loader to the end; time a section leaves over goes to the next
    start, rows = time.perf_counter(), {}
    for name, until, fn in (("correctness", 0.30, lambda b: correctness(cfg, device, b, args.tiny)),
                            ("speed", 0.85, lambda b: speed_section(cfg, device, b, args.tiny)),
                            ("loader", 1.0, lambda b: loader(cfg, device, b, rows["speed"]))):
        # --tiny (the CI check) runs every row whatever the machine's load: no time budget
        budget = Budget(math.inf if args.tiny else start + until * args.budget - time.perf_counter())
        print(f"bench gpu | {name} ({max(budget.left(), 0):.0f} s) ...", flush=True)
        rows[name] = fn(budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  torch=torch.__version__, cuda=torch.version.cuda, command="python benchmarks/bench.py gpu" +
                  (f" --device {args.device}" if args.device != "cuda" else "") + (" --tiny" if args.tiny else ""),
                  shapes=f"{cfg['arch']} {cfg['image_size']} px (adclr: {cfg['vit']}), batch {cfg['batch']}, "
                  f"{'bf16' if device.type == 'cuda' else 'fp32'}, median of {cfg['steps']} steps after {cfg['warmup']}",
                  wall_s=time.perf_counter() - t0, **rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out / "gpu_report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'}")
    failed = [r["check"] for r in rows["correctness"] if r["ok"] is False]
    if failed:
        raise SystemExit(f"benchmarks/bench.py gpu: {len(failed)} correctness check(s) failed: {'; '.join(failed)}")
    return report
