"""The GPU tier: `pytest -m cuda` on a machine with CUDA (skipped without it), then
`python benchmarks/bench.py gpu`. Every method file trains two steps on the GPU under --amp auto
(bf16), fp16 (GradScaler) and fp32, with and without --gpu-augment, and with --compile (inductor) for a
ResNet and a ViT method (bench.py gpu compiles every method's train_step); mcl.py --save-montage on
device views; decon.py --skip-dropout 0.5 and --decoder fcn; each evaluation task a few iterations;
with two GPUs, two NCCL processes: SyncBN and shuffle BN equal one process's batch statistics, and
the ranks end with equal weights.

Estimate by counts (not measured: no GPU has run it yet): 18 + 2 + 1 short method runs and 5 short
evaluations at a few seconds each, 2 inductor compilations of about a minute each: about 4 minutes
on one H100; with bench.py gpu (at most 9 minutes) about 12-13 minutes.
"""
import importlib
import json
import math

import numpy as np
import pytest
import torch

import common
from conftest import assert_ranks_equal, rank_dump_script, torchrun
from test_standalone import CASES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _finite_numbers(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [v for item in x for v in _finite_numbers(item)] if isinstance(x, list) else []


def train(tmp_path, script, *flags, steps=2):
    """Run `script`'s main in this process on the GPU; check the log's losses are finite."""
    module = importlib.import_module(script[:-3])
    out = tmp_path / "run"
    module.main([*CASES[script], *map(str, flags), "--max-steps", str(steps), "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [v for rec in records for k, v in rec.items() if "loss" in k]
    assert losses and all(math.isfinite(v) for v in _finite_numbers(losses))
    assert common.load_checkpoint(out / "checkpoint.pth")["step"] == steps
    return out


@pytest.mark.parametrize("amp,flags", [("auto", ["--gpu-augment"]), ("fp16", []), ("fp32", ["--gpu-augment"])])
@pytest.mark.parametrize("script", sorted(CASES))
def test_every_method_trains_on_the_gpu(tmp_path, script, amp, flags):
    train(tmp_path, script, "--amp", amp, *flags)


@pytest.mark.parametrize("script", ["moco.py", "adclr.py"])  # a ResNet and a ViT
def test_compile_trains_on_the_gpu(tmp_path, script):
    train(tmp_path, script, "--compile", "--gpu-augment")


@pytest.mark.parametrize("flags", [["--skip-dropout", "0.5"], ["--decoder", "fcn"]])
def test_decon_variants_on_the_gpu(tmp_path, flags):
    train(tmp_path, "decon.py", *flags, steps=3)


def test_mcl_montage_from_device_views(tmp_path):
    import mcl
    from PIL import Image
    path = tmp_path / "montage.png"
    assert mcl.main([*CASES["mcl.py"], "--gpu-augment", "--save-montage", str(path), "--output-dir", str(tmp_path / "run")]) is None
    img = np.asarray(Image.open(path))
    assert img.shape == (32, 4 * 32, 3) and img.std() > 0  # one montage per ratio, side by side


EVAL = ["--init", "random", "--arch", "resnet18", "--synthetic-size", "64", "--synthetic-train", "16", "--synthetic-val",
        "8", "--batch-size", "4", "--workers", "0"]
EVAL_TASKS = {
    "probe": ["--crop-size", "64", "--iters", "3"],
    "finetune": ["--crop-size", "64", "--iters", "3"],
    "detect": ["--iters", "3", "--train-sizes", "64", "--test-size", "64", "--proposals", "50", "--rois-per-image", "32"],
    "knn": ["--crop-size", "64", "--k", "3"],
    "linear": ["--crop-size", "64", "--epochs", "1"],
}


@pytest.mark.parametrize("task", sorted(EVAL_TASKS))
def test_every_evaluation_task_on_the_gpu(tmp_path, task):
    import eval_dense
    eval_dense.main([*EVAL, "--task", task, *EVAL_TASKS[task], "--output-dir", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    numbers = _finite_numbers(metrics)
    assert numbers and all(math.isfinite(v) for v in numbers)


BN_CHECK = '''
import sys
sys.path.insert(0, {repo!r})
import torch, torch.nn.functional as F
import common, moco
rank, world, device = common.init_distributed()
torch.manual_seed(rank)
x = torch.randn(4, 8, device=device)  # (B, C): this rank's batch
x_all = common.concat_all_gather(x)  # (W·B, C)
ref = F.batch_norm(x_all, None, None, training=True)  # one process, the global batch
sync = common.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(8)), True).to(device)
assert isinstance(sync[0], torch.nn.SyncBatchNorm)
torch.testing.assert_close(sync(x), ref.view(world, 4, 8)[rank], atol=1e-5, rtol=1e-5)
# shuffle BN: each rank normalises a random group of the global batch, then the keys come back
shuffled, unshuffle = moco.batch_shuffle(x)
keys = moco.batch_unshuffle(F.batch_norm(shuffled, None, None, training=True), unshuffle)  # (B, C)
unshuffle_all = common.concat_all_gather(unshuffle)  # (W·B,)
groups = x_all[torch.argsort(unshuffle_all)].view(world, 4, 8)  # the images each rank normalised
one = torch.cat([F.batch_norm(g, None, None, training=True) for g in groups])[unshuffle_all]  # back in order
torch.testing.assert_close(keys, one.view(world, 4, 8)[rank], atol=1e-5, rtol=1e-5)
print("ok", rank)
'''


@two_gpus
def test_syncbn_and_shuffle_bn_equal_one_process_statistics_under_nccl(tmp_path):
    from conftest import REPO
    script = tmp_path / "bn_check.py"
    script.write_text(BN_CHECK.format(repo=str(REPO)))
    out = torchrun(2, script)
    assert "ok 0" in out and "ok 1" in out


@two_gpus
@pytest.mark.parametrize("script", ["moco.py", "decon.py"])  # shuffle BN; SyncBN
def test_two_nccl_processes_end_with_equal_weights(tmp_path, script):
    dump = rank_dump_script(tmp_path, script[:-3])
    torchrun(2, dump, *CASES[script], "--max-steps", "2", "--output-dir", tmp_path / "run")
    assert_ranks_equal(tmp_path, 50)
