r"""Check a method file against its official code on identical weights and inputs.

    python checks/official.py METHOD --official PATH [--steps 4] [--world 2] [--commit HASH]

METHOD is a method file; PATH is your own checkout of its official repository:

    moco     facebookresearch/moco    moco/builder.py (MoCo v2: mlp=True, T 0.2), main_moco.py's loop
    densecl  WXinlong/DenseCL         openselfsup/models/densecl.py, necks.py, heads, backbones
    mcl      GuoQiushan/MCL           openselfsup/models/mcl.py, necks.py (FPN, region head), heads,
                                      utils/optimizers.py, hooks/byol_hook.py, apis/train.py's
                                      build_optimizer
    decon    CVMI-Lab/SlotCon         models/slotcon.py, models/resnet.py, utils/lars.py,
                                      utils/lr_scheduler.py (decon.py --decoder none: plain SlotCon)
    decon-sl the DeCon authors' fork  its models/slotcon.py (decoder_q/k) and decoder.py (detectron2 FPN),
                                      found anywhere under PATH (decon.py: DeCon-SL)
    decon-ml the same                 decon.py --deep-supervision --skip-channel-dropout 0.5
    decon-fcn the same                decon.py --decoder fcn --fcn-channels 512 --fcn-dilation 1
    adclr    facebookresearch/dino    main_dino.py (train_one_epoch, DINOLoss), vision_transformer.py,
                                      utils.py (adclr.py --query-weight 0: plain DINO)

Not covered: decon_densecl.py and ADCLR's query path (no official ADCLR code;
the authors' PQCL code implements a different loss). Each checks/vs_*.py docstring says what
it builds and runs, and what is held fixed.

Nothing of the official code is part of this repository: it is imported from PATH at run time, by
file location (its package names would clash with the method files'), without installing its
framework. Where it imports something this machine lacks (CUDA, mmcv 0.x/1.0, OpenSelfSup's package
__init__ files), the check provides the few names it uses (checks/stand_ins.py) and prints which.

What is compared. Both models are built, the official weights are copied into the method file's
model through an explicit key mapping (every key on both sides mapped, shapes equal), both get the
same inputs (the views of every step, drawn here) and the same random choices: the seeded generator
before each step where both draw alike (shuffle-BN permutations), and where they draw differently,
the official draws recorded and replayed (DINO's drop-path masks, MCL's montage permutations).
Both take --steps optimizer steps. The table lists, per step, the loss and every parameter's
gradient (as the optimizer receives it), and after the last step the weights, BatchNorm statistics,
queues, centers and EMA networks. The official distributed code (all_gather, broadcast, shuffle
BN, DDP, center all-reduce) runs in --world gloo processes on the CPU (default 2); rows are per
process and the table shows the worst one.

Verdict: everything runs in float64 (see ATOL below for why); a row is EQUAL when
max|mine - official| <= ATOL + RTOL * max|official| over every tensor of the row, else DIFFERENT,
and the command exits 1 if any row is DIFFERENT. "max rel" is max|mine - official| / max|official|,
the largest over the row's tensors whose max|official| exceeds 1000 * ATOL (near-zero tensors, such
as the gradients behind a zero-initialised BatchNorm gamma, are judged by ATOL alone).

docs/methods.md, "Checked against the official code", holds the measured tables and the commits.
"""
import argparse
import contextlib
import datetime
import importlib
import importlib.util
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).resolve().parent
# EQUAL within ATOL + RTOL * max|official|. The comparison runs in float64: a tiny network on a few
# images is ill-conditioned enough that fp32 rounding differences of two equivalent operation orders
# grow into visible gradient differences within a few steps; in float64 they stay near 1e-13
# relative (docs/methods.md), and a real difference shows many orders above RTOL.
ATOL, RTOL = 1e-10, 1e-7
# METHOD: (module in checks/ that knows the official code, the official repository)
METHODS = {
    "moco": ("vs_moco", "facebookresearch/moco"),
    "adclr": ("vs_dino", "facebookresearch/dino"),  # DINO: adclr.py --query-weight 0
    "densecl": ("vs_densecl", "WXinlong/DenseCL"),
    "mcl": ("vs_mcl", "GuoQiushan/MCL"),
    "decon": ("vs_slotcon", "CVMI-Lab/SlotCon"),  # decon.py --decoder none: SlotCon, DeCon's baseline
    "decon-sl": ("vs_decon", "the DeCon authors' repository"),  # decon.py: DeCon-SL
    "decon-ml": ("vs_decon_ml", "the DeCon authors' repository"),  # decon.py --deep-supervision
    "decon-fcn": ("vs_decon_fcn", "the DeCon authors' repository"),  # decon.py --decoder fcn
}


# =================================================================================================
# Comparison table
# =================================================================================================
class Table:
    """Rows of (quantity, max abs diff, max rel diff, verdict, worst tensor) for one method."""

    def __init__(self, atol=ATOL, rtol=RTOL):
        self.rows, self.atol, self.rtol = [], atol, rtol

    def add(self, quantity, official, mine):
        """Compare two tensors, or two dicts of tensors with the same keys (one row for all of them)."""
        if torch.is_tensor(official):
            official, mine = {"": official}, {"": mine}
        if set(official) != set(mine):
            raise KeyError(f"{quantity}: keys differ: only official {sorted(set(official) - set(mine))}, "
                           f"only mine {sorted(set(mine) - set(official))}")
        worst, worst_ratio, abs_max, rel_max = "", -1.0, 0.0, 0.0
        for name in sorted(official):
            a, b = mine[name].detach().double(), official[name].detach().double()
            if a.shape != b.shape:
                raise ValueError(f"{quantity} {name}: shape {tuple(a.shape)} (mine) vs {tuple(b.shape)} (official)")
            diff = (a - b).abs().max().item() if a.numel() else 0.0
            scale = b.abs().max().item() if b.numel() else 0.0
            diff = float("inf") if diff != diff else diff  # NaN on either side: DIFFERENT
            rel = diff / scale if scale > 1e3 * self.atol else 0.0  # tensors of ~zero scale: judged by atol only
            ratio = diff / (self.atol + self.rtol * scale)  # > 1: beyond rounding
            if ratio > worst_ratio:
                worst, worst_ratio = name, ratio
            abs_max, rel_max = max(abs_max, diff), max(rel_max, rel)
        equal = worst_ratio <= 1
        if len(official) > 1:
            quantity = f"{quantity} ({len(official)} tensors)"
        self.rows.append((quantity, abs_max, rel_max, "EQUAL" if equal else "DIFFERENT", worst))

    @property
    def equal(self):
        return all(r[3] == "EQUAL" for r in self.rows)

    def merge(self, other):
        """Row-wise worst of two ranks' tables (same quantities in the same order)."""
        merged = Table(self.atol, self.rtol)
        for a, b in zip(self.rows, other.rows):
            assert a[0] == b[0], (a[0], b[0])
            verdict = "EQUAL" if a[3] == b[3] == "EQUAL" else "DIFFERENT"
            worst = a[4] if a[1] >= b[1] else b[4]
            merged.rows.append((a[0], max(a[1], b[1]), max(a[2], b[2]), verdict, worst))
        return merged

    def format(self):
        width = max([len("quantity")] + [len(r[0]) for r in self.rows])
        lines = [f"| {'quantity':<{width}} | max abs diff | max rel diff | verdict |",
                 f"|{'-' * (width + 2)}|--------------|--------------|---------|"]
        for quantity, diff, rel, verdict, worst in self.rows:
            note = f" (worst: {worst})" if verdict != "EQUAL" and worst else ""
            lines.append(f"| {quantity:<{width}} | {diff:12.3e} | {rel:12.3e} | {verdict:<7} |{note}")
        return "\n".join(lines)


# =================================================================================================
# Weights, inputs, official modules
# =================================================================================================
def map_keys(official_state, rename):
    """Rename an official state dict with `rename` (official key -> my key, or None to drop it);
    returns the new dict. Two official keys may not land on one of mine."""
    out = {}
    for key, value in official_state.items():
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise KeyError(f"official keys mapped twice onto {new}")
        out[new] = value
    return out


def load_mapped(module, official_state, rename):
    """Copy official weights into `module` by the explicit mapping `rename`: every key of `module`
    must receive one, every official key must land (or be dropped by `rename` on purpose), shapes
    equal. Returns the mapped dict."""
    mapped = map_keys(official_state, rename)
    mine = module.state_dict()
    missing, unexpected = sorted(set(mine) - set(mapped)), sorted(set(mapped) - set(mine))
    if missing or unexpected:
        raise KeyError(f"key mapping incomplete: not filled {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"no such key here {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in mapped.items():
        if mine[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(mine[k].shape)} here vs {tuple(v.shape)} official")
    module.load_state_dict({k: v.clone() for k, v in mapped.items()})
    return mapped


def from_rank0(tensors):
    """Rank 0's copy of each tensor in the dict, on every rank (for state that is per-process by
    design on one side only, e.g. BatchNorm statistics one DDP wrapper re-broadcasts and the other
    does not: only rank 0 saves)."""
    out = {k: v.clone() for k, v in tensors.items()}
    if dist.get_world_size() > 1:
        for v in out.values():
            dist.broadcast(v, src=0)
    return out


def is_bn_statistic(key):
    """BatchNorm running statistics (buffers, not trained)."""
    return "running_" in key or "num_batches_tracked" in key


def mapped_grads(named_params, rename):
    """{my name: grad} of the official parameters that have one, renamed by `rename`."""
    return {rename(n): p.grad.detach().clone() for n, p in named_params if p.grad is not None and rename(n) is not None}


def import_file(path, name):
    """Import one official file by location under a unique module name (the official package names,
    e.g. `moco`, clash with the method files)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: not found; --official must be a checkout of the official repository")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_project(name):
    """A method file of this repository (the root on sys.path first, so `import common` is ours)."""
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name)


@contextlib.contextmanager
def float64(notes):
    """Both implementations in float64: default dtype float64, and Tensor.float() keeps float64 (the
    method files cast their loss inputs with .float() for autocast; here that would only add fp32
    rounding to one side)."""
    notes.add("float64 throughout: default dtype float64; stand-in: Tensor.float() keeps float64 tensors")
    saved_dtype, saved_float = torch.get_default_dtype(), torch.Tensor.float
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else self.to(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved_dtype)
        torch.Tensor.float = saved_float


@contextlib.contextmanager
def cpu_cuda(notes):
    """Stand-in: Tensor.cuda() / Module.cuda() return the object on the CPU (the official code calls
    .cuda() on the shuffle permutation and the labels)."""
    notes.add("stand-in: torch.Tensor.cuda and nn.Module.cuda return the CPU object (no CUDA here)")
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def official_commit(path, flag=None):
    """The commit PATH is checked out at (git metadata), else --commit, else "unknown"."""
    if flag:
        return flag
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return out.stdout.strip() + (" (with local changes to its .py files)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# =================================================================================================
# Running under a process group
# =================================================================================================
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, method, official, args, out):
    """One gloo process: join the group, run the method's check, write (table, notes) to `out`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that stops (bad PATH) leaves the other waiting in a collective: not for gloo's 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(minutes=10))
    try:
        table, notes = run_check(method, official, args)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump((table, notes), f)
    except SystemExit as e:  # a clear one-line message: handed to the parent
        with open(f"{out}.error", "w") as f:
            f.write(str(e))
    finally:
        dist.destroy_process_group()


def run_check(method, official, args):
    """Run the check of `method` in this process (a process group is already set up)."""
    if str(CHECKS) not in sys.path:
        sys.path.insert(0, str(CHECKS))
    module = importlib.import_module(METHODS[method][0])
    if hasattr(module, "KEEP_DEFECTS"):
        module.KEEP_DEFECTS = args.keep_defects
    notes = set()
    table = Table()
    with float64(notes), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the official code's deprecated calls
        warnings.filterwarnings("ignore", module="torch.optim.lr_scheduler")  # SlotCon's scheduler.step(epoch)
        module.check(Path(official), args, table, notes)
    return table, notes


def run_ranks(method, official, args):
    """Run the check in args.world gloo processes (or in this one for --world 1); returns the merged
    table and the notes."""
    with tempfile.TemporaryDirectory() as tmp:
        out, port = os.path.join(tmp, "result"), _free_port()
        if args.world == 1 and not dist.is_initialized():
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
            try:
                return run_check(method, official, args)
            finally:
                dist.destroy_process_group()
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                    os.environ.pop(k, None)
        torch.multiprocessing.start_processes(_rank_main, args=(args.world, port, method, str(official), args, out),
                                              nprocs=args.world, start_method="spawn")
        if os.path.exists(f"{out}.error"):
            raise SystemExit(open(f"{out}.error").read())
        results = []
        for rank in range(args.world):
            with open(f"{out}.{rank}", "rb") as f:
                results.append(pickle.load(f))
    table, notes = results[0]
    for other, more in results[1:]:
        table = table.merge(other)
        notes |= more
    return table, notes


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Compare a method file with its official code on identical weights and "
                                            "inputs", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("method", choices=sorted(METHODS))
    p.add_argument("--official", required=True, help="your checkout of the official repository")
    p.add_argument("--commit", default=None, help="the official commit, where PATH has no git metadata")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps compared")
    p.add_argument("--world", type=int, default=2, help="gloo processes (the official DDP code runs in them)")
    p.add_argument("--arch", default=None, help="backbone (default: the method's small one)")
    p.add_argument("--image-size", type=int, default=None, help="crop side (default: the method's small one)")
    p.add_argument("--keep-defects", action="store_true",
                   help="decon-sl: run the official code with its two defects (default: emulate decon.py's fixes on "
                        "the official side)")
    args = p.parse_args(argv)
    if not Path(args.official).is_dir():
        p.error(f"--official {args.official}: no such folder; give your checkout of {METHODS[args.method][1]}")
    if args.steps < 1 or args.world < 1:
        p.error("--steps and --world must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only fight over the cores
    try:
        table, notes = run_ranks(args.method, args.official, args)
    finally:
        torch.set_num_threads(threads)
    print(f"{args.method} vs {METHODS[args.method][1]} at {official_commit(args.official, args.commit)} "
          f"({args.official}), {args.steps} steps, {args.world} gloo process(es), "
          f"EQUAL: max|diff| <= {ATOL:g} + {RTOL:g}*max|official| in float64")
    for note in sorted(notes):
        print(f"  - {note}")
    print(table.format())
    verdict = "EQUAL" if table.equal else "DIFFERENT"
    print(f"{args.method}: {verdict}")
    return 0 if table.equal else 1


if __name__ == "__main__":
    sys.exit(main())
