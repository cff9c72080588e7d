"""Reliability (common.py, so every script): divergence, exact resume, signals, refused resumes,
damaged checkpoints, bad flags, awkward images."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_dense
import moco
from conftest import REPO, TINY, python

# Each method at its smallest: 4 steps per epoch (mcl: 2), 3 epochs.
RUNS = {
    "moco": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "densecl": [*TINY, "--bn-splits", "2", "--queue-size", "64"],
    "decon": [*TINY, "--dim-hidden", "64"],
    "mcl": ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--synthetic-len", "64", "--workers", "0",
            "--log-every", "1", "--head-windows", "scored"],  # the cheaper head path: the same resume machinery
    "adclr": ["--arch", "vit_micro", "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--num-queries",
              "4", "--out-dim", "128", "--synthetic-len", "32", "--batch-size", "8", "--workers", "0", "--log-every", "1"],
}


def _start(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)


def _popen(cmd, **kw):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def _tensors(obj, prefix=""):
    """Every tensor of a nested checkpoint, by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


@pytest.mark.parametrize("method,workers,extra", [(m, "0", []) for m in RUNS] + [("densecl", "2", []),
                                                                                 ("decon", "2", ["--gpu-augment"])])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, method, workers, extra):
    """Stop at step 3 (not an epoch boundary), resume, finish: every tensor of the final checkpoint,
    weights, optimizer state, queues, centers and RNG states, equals the uninterrupted run's."""
    argv = [f"{method}.py", *RUNS[method], "--workers", workers, "--epochs", "2", *extra]
    first = [_start([*argv, "--output-dir", tmp_path / "a"]), _start([*argv, "--output-dir", tmp_path / "b", "--max-steps", "3"])]
    assert all(p.wait(timeout=600) == 0 for p in first), [p.stderr.read()[-2000:] for p in first]  # side by side: 2 cores
    text = python(*argv, "--output-dir", tmp_path / "b")
    assert "at step 3" in text
    a, b = (common.load_checkpoint(tmp_path / d / "checkpoint.pth") for d in "ab")
    ta, tb = dict(_tensors({k: v for k, v in a.items() if k != "args"})), dict(_tensors({k: v for k, v in b.items() if k != "args"}))
    assert ta.keys() == tb.keys() and len(ta) > 100
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == a["step"]  # no step logged twice


def test_views_do_not_depend_on_the_number_of_loader_workers():
    ds = common.SyntheticScenes(8, 48, transform=common.TwoViews(common.moco_v2_augmentation(32)))
    batches = []
    for workers in (0, 2):
        loader = common.make_loader(ds, 4, workers, 0, torch.device("cpu"))
        loader.sampler.set_epoch(1)
        batches.append([v for batch in loader for v in batch])
    assert all(torch.equal(x, y) for x, y in zip(*batches))


@pytest.mark.parametrize("method", ["moco", "mcl"])
def test_divergence_stops_without_saving_nan(tmp_path, method):
    out = tmp_path / "run"
    lr = {"moco": "1e12", "mcl": "1e9"}[method]
    proc = _popen([f"{method}.py", *RUNS[method], "--epochs", "3", "--save-every", "1", "--lr", lr, "--output-dir", out])
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "diverged: a non-finite loss or weight at step" in proc.stderr
    assert not (out / "downstream.pth").exists()
    for line in (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []:
        json.loads(line)  # valid JSON: no bare NaN
    if (out / "checkpoint.pth").exists():  # whatever was saved is finite
        ck = common.load_checkpoint(out / "checkpoint.pth")
        assert f"the last good checkpoint is {out / 'checkpoint.pth'} (step {ck['step']})" in proc.stderr
        assert all(torch.isfinite(t).all() for _, t in _tensors(ck) if t.is_floating_point())


def test_logged_non_finite_values_stay_valid_json(tmp_path):
    log = common.JsonLog(tmp_path / "log.jsonl")
    log.write(step=1, loss=float("nan"), levels=[1.0, float("inf")])
    rec = json.loads((tmp_path / "log.jsonl").read_text())
    assert rec["loss"] is None and rec["levels"] == [1.0, None]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_says_how_to_resume(tmp_path, sig, code):
    """SIGTERM to the process (a scheduler); SIGINT to the whole process group with two loader workers,
    as Ctrl-C in a terminal sends it: one message for the run, not one per worker."""
    out = tmp_path / "run"
    workers = ["--workers", "2"] if sig == signal.SIGINT else []
    argv = ["moco.py", *RUNS["moco"], "--synthetic-len", "4096", *workers, "--output-dir", out]
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.count(f"{signal.Signals(sig).name} received") == 1, err[-2000:]
    step = common.load_checkpoint(out / "checkpoint.pth")["step"]
    assert step >= 2 and step % 512 != 0 and "Rerun the same command to resume" in err  # mid-epoch, saved
    text = python(*argv, "--max-steps", step + 1)
    assert f"at step {step}" in text


def _stop_worker(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    common._RUN["stop"] = signal.SIGTERM if rank == 1 else 0  # only rank 1 got the signal
    torch.save(torch.tensor([common.stop_requested(), float(common.mean_over_ranks(torch.tensor(float(rank))))]),
               f"{out}/stop{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_stop_step_and_average_the_logged_loss(tmp_path):
    torch.multiprocessing.spawn(_stop_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"stop{rank}.pt", weights_only=True).tolist() == [signal.SIGTERM, 0.5]


def test_a_refused_resume_names_the_arguments_and_keeps_args_json(tmp_path):
    out = tmp_path / "run"
    python("moco.py", *RUNS["moco"], "--max-steps", "1", "--output-dir", out)
    stored = (out / "args.json").read_text()
    with pytest.raises(SystemExit) as stop:
        moco.main([*RUNS["moco"], "--max-steps", "2", "--queue-size", "128", "--arch", "resnet34", "--output-dir", str(out)])
    said = str(stop.value.code)
    assert "--queue-size 64 in the checkpoint, 128 now" in said and "--arch 'resnet18' in the checkpoint, 'resnet34' now" in said
    assert (out / "args.json").read_text() == stored
    text = python("moco.py", *RUNS["moco"], "--max-steps", "2", "--workers", "1", "--log-every", "5", "--output-dir", out)
    assert "at step 1" in text  # loader workers and logging do not change the result: allowed


def test_damaged_or_foreign_checkpoints_get_a_clear_message(tmp_path):
    out = tmp_path / "run"
    python("moco.py", *RUNS["moco"], "--max-steps", "2", "--save-every", "1", "--output-dir", out)
    ck, prev = out / "checkpoint.pth", out / "checkpoint.prev.pth"
    assert common.load_checkpoint(prev)["step"] == 1 and common.load_checkpoint(ck)["step"] == 2  # one save back kept
    good = ck.read_bytes()
    for damage in (b"\x13\x37 random bytes" * 50, good[:len(good) // 2]):
        ck.write_bytes(damage)
        with pytest.raises(SystemExit) as stop:  # in this process: the run stops before training
            moco.main([*RUNS["moco"], "--max-steps", "3", "--output-dir", str(out)])
        said = str(stop.value.code)
        assert f"cannot read {ck}" in said and "mv " in said and f"cp {prev} {ck}" in said and "weights_only" not in said
        assert "objects other than tensors" not in said  # random or cut bytes are not a checkpoint, not a foreign pickle
    ck.write_bytes(good)
    (out / "checkpoint.pth.tmp").write_bytes(b"half a write")
    other = tmp_path / "decon"
    both = [_start(["moco.py", *RUNS["moco"], "--max-steps", "3", "--output-dir", out]),
            _start(["decon.py", *RUNS["decon"], "--max-steps", "1", "--output-dir", other])]
    assert all(p.wait(timeout=600) == 0 for p in both)
    assert not (out / "checkpoint.pth.tmp").exists()
    with pytest.raises(SystemExit) as stop:
        moco.main([*RUNS["moco"], "--max-steps", "3", "--output-dir", str(other)])
    assert "is not a checkpoint of this script" in str(stop.value.code)


@pytest.mark.parametrize("script,flags,says", [
    ("decon.py", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("mcl.py", ["--lr", "-1", "--batch-size", "32"], "--lr -1.0: must be > 0"),
    ("moco.py", ["--epochs", "0"], "--epochs 0: must be > 0"),
    ("moco.py", ["--image-size", "0"], "--image-size 0: must be >= 32"),
    ("densecl.py", ["--image-size", "16"], "--image-size 16: must be >= 32"),
    ("adclr.py", ["--global-size", "0"], "--global-size 0: must be > 0"),
    ("moco.py", ["--save-every", "0"], "--save-every 0: must be > 0"),
    ("densecl.py", ["--log-every", "0"], "--log-every 0: must be > 0"),
    ("eval_dense.py", ["--iters", "0"], "--iters 0: must be > 0"),
])
def test_flags_that_would_train_wrong_are_refused(script, flags, says, capsys):
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stop:
        module.get_args(flags)
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_init_of_another_arch_names_the_stored_one(tmp_path):
    path = tmp_path / "downstream.pth"
    common.save_downstream(path, "test", "resnet50", common.ResNetTrunk("resnet50"))
    proc = _popen(["eval_dense.py", "--init", path, "--arch", "resnet18", "--iters", "1", "--synthetic-train", "8",
                   "--synthetic-val", "4", "--synthetic-size", "32", "--crop-size", "32", "--batch-size", "4",
                   "--workers", "0", "--output-dir", tmp_path / "ev"])
    assert proc.returncode != 0 and "does not fit a resnet18 (the file's architecture: resnet50;" in proc.stderr
    assert "Pass the right --arch (resnet50)" in proc.stderr and proc.stderr.count("size mismatch") == 0


def test_sixteen_bit_and_exif_rotated_images(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 31).astype(np.uint16)  # 0 .. 63457
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = np.asarray(common.open_rgb(tmp_path / "deep.png"))
    assert img.shape == (32, 64, 3) and (img == 255).mean() < 0.01 and abs(int(img[-1, -1, 0]) - 63457 // 257) <= 1
    photo = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert common.open_rgb(tmp_path / "phone.jpg").size == (20, 40)
    assert common.open_rgb(tmp_path / "phone.jpg", exif=False).size == (40, 20)


def test_a_corrupt_image_is_warned_once_across_workers(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(folder / f"{i:02d}.jpg")
    (folder / "00.jpg").write_bytes(b"broken")
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import common, torch\n"
            f"ds = common.ImageFiles(common.find_images({str(folder)!r}), lambda im: torch.zeros(1))\n"
            f"loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)\n"
            f"for epoch in range(2):\n    list(loader)\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0 and proc.stderr.count("UserWarning: skipping unreadable image") == 1
    assert list(tmp.iterdir()) == []  # the markers' folder goes with the run (CI's disk is shared)


def test_probe_metrics_say_linear_and_stay_json_without_pixels(tmp_path):
    names = ["a", "b"]
    empty = eval_dense.metrics_from_confusion(torch.zeros(2, 2, dtype=torch.long), names)
    assert json.loads(json.dumps(empty, allow_nan=False))["mIoU"] is None
    out = tmp_path / "ev"
    python("eval_dense.py", "--arch", "resnet18", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train", "8",
           "--synthetic-val", "4", "--iters", "2", "--batch-size", "4", "--workers", "0", "--output-dir", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["head"] == "linear" and m["task"] == "probe"
