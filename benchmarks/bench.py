"""The benchmarks: step time, losses, the loader, a GPU window and the miniature reproduction.

    python benchmarks/bench.py speed --arch resnet50 --image-size 224 --batch-size 8   # CPU or CUDA (speed.py)
    python benchmarks/bench.py loss                                # batched losses vs naive loops (speed.py)
    python benchmarks/bench.py data --workers 2 8                  # loader images/s per pipeline (speed.py)
    python benchmarks/bench.py gpu                                 # a GPU window of at most 9 min (gpu.py)
    python benchmarks/bench.py memory                              # per-GPU memory estimate, measured on the CPU (memory.py)
    python benchmarks/bench.py quality --tier cpu --seeds 0 1 2    # the miniature reproduction (quality.py)

Run it from anywhere: it puts the repository root (common.py, the method files) on the import path.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: common.py, the method files

from benchmarks import gpu, memory, quality, speed  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="method step vs floor step")
    s.add_argument("--methods", nargs="+", default=list(speed.METHODS), choices=speed.METHODS)
    s.add_argument("--arch", default="resnet50", help="ResNet for moco/densecl/decon/mcl")
    s.add_argument("--vit", default="vit_small", help="ViT for adclr")
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--batch-size", type=int, default=8, help="per device")
    s.add_argument("--steps", type=int, default=10, help="timed steps of each (after --warmup)")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    s.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    sub.add_parser("loss", help="batched losses vs naive per-sample loops at the papers' shapes")
    d = sub.add_parser("data", help="images/s the loader delivers per method pipeline, from real JPEG files")
    d.add_argument("--workers", type=int, nargs="+", default=[2])
    d.add_argument("--images", type=int, default=256)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--batch-size", type=int, default=32)
    g = sub.add_parser("gpu", help="one command for a GPU window (benchmarks/gpu.py): correctness, speed, loader -> gpu_report")
    g.add_argument("--device", default="cuda", help="cuda, or cpu with --tiny (the CI check)")
    g.add_argument("--tiny", action="store_true", help="tiny shapes: seconds on a CPU")
    g.add_argument("--budget", type=float, default=500, help="seconds for all sections (the window allows 9 minutes); none with --tiny")
    g.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers")
    g.add_argument("--out", default=".", help="folder for gpu_report.json and gpu_report.md")
    m = sub.add_parser("memory", help="estimate of each method's peak memory per GPU, from two fp32 CPU steps (memory.py)")
    m.add_argument("--methods", nargs="+", default=list(memory.METHODS), choices=memory.METHODS)
    m.add_argument("--arch", default="resnet50", help="ResNet for moco/densecl/decon/mcl")
    m.add_argument("--vit", default="vit_small", help="ViT for adclr")
    m.add_argument("--batches", type=int, nargs=2, default=[2, 4], help="the two measured batches (MCL: 32 and 64)")
    q = sub.add_parser("quality", help="the miniature reproduction (benchmarks/quality.py): floor, ceiling, every method")
    q.add_argument("--tier", default="cpu", choices=list(quality.TIERS),
                   help="budget (toy: the test's); -mono: the same on the colourless scenes (--synthetic-style mono)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--methods", nargs="+", default=None, help="a subset (default: all)")
    q.add_argument("--out", default="runs/quality")
    q.add_argument("--detection", action="store_true",
                   help="also Mask R-CNN box / mask AP of every ResNet row (needs pycocotools; adds det_iters "
                        "per row: about 37 min a row at the CPU tier, docs/miniature.md)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.command == "speed" and args.one:  # one method in this process (speed.speed's subprocesses)
        print(json.dumps(speed.speed_one(args, args.methods[0])))
    elif args.command == "speed":
        speed.speed(args)
    elif args.command == "loss":
        speed.bench_losses()
    elif args.command == "data":
        speed.bench_data(args)
    elif args.command == "gpu":
        gpu.gpu(args)
    elif args.command == "memory":
        memory.memory(args)
    elif args.command == "quality":
        quality.quality(args)


if __name__ == "__main__":
    main()
