"""moco.py: loss, queue, momentum, shuffle BN, and whole runs (resume, torchrun, copied alone)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import common
import moco
from conftest import TINY, assert_ranks_equal, python, rank_dump_script, torchrun


def test_infonce_equals_naive_per_sample():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    queue = F.normalize(torch.randn(16, 50), dim=0)
    losses = []
    for i in range(6):  # one image at a time, written from the paper's Eq. 1
        pos = torch.exp(q[i] @ k[i] / 0.2)
        neg = sum(torch.exp(q[i] @ queue[:, j] / 0.2) for j in range(50))
        losses.append(-torch.log(pos / (pos + neg)))
    assert torch.allclose(moco.infonce(q, k, queue, 0.2), torch.stack(losses).mean(), atol=1e-5)


def test_queue_push_and_pointer_wraparound():
    queue = moco.Queue(dim=3, size=10)
    batches = [torch.full((4, 3), float(i)) for i in range(1, 4)]
    for b in batches[:2]:
        queue.push(b)
    assert queue.ptr.item() == 8 and (queue.keys[:, :4] == 1).all() and (queue.keys[:, 4:8] == 2).all()
    old = queue.keys[:, 2:4].clone()
    queue.push(batches[2])  # columns 8, 9, then wraps to 0, 1
    assert queue.ptr.item() == 2
    assert (queue.keys[:, 8:] == 3).all() and (queue.keys[:, :2] == 3).all()
    assert torch.equal(queue.keys[:, 2:4], old) and (queue.keys[:, 4:8] == 2).all()


def test_momentum_update_moves_key_by_one_minus_m():
    torch.manual_seed(0)
    q_net, k_net = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    before = [p.detach().clone() for p in k_net.parameters()]
    moco.momentum_update(list(k_net.parameters()), list(q_net.parameters()), 0.9)
    for b, k, q in zip(before, k_net.parameters(), q_net.parameters()):
        assert torch.allclose(k, b + 0.1 * (q - b), atol=1e-7)
        assert not torch.allclose(k, b)


def _shuffle_worker(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different local seeds: only rank 0's permutation may be used
    x = (rank * 100 + torch.arange(4, dtype=torch.float32)).view(4, 1).repeat(1, 3)  # (B, 3): sample ids
    shuffled, unshuffle = moco.batch_shuffle(x)
    y = shuffled * 2 + 1  # any per-sample function, as an encoder is
    back = moco.batch_unshuffle(y, unshuffle)
    torch.save({"x": x, "shuffled": shuffled, "back": back}, f"{out}/shuffle{rank}.pt")
    torch.distributed.destroy_process_group()


def test_shuffle_then_unshuffle_returns_each_samples_own_output(tmp_path):
    torch.multiprocessing.spawn(_shuffle_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"shuffle{i}.pt", weights_only=True) for i in range(2)]
    for d in r:
        assert torch.equal(d["back"], d["x"] * 2 + 1)
    everything = torch.cat([r[0]["shuffled"], r[1]["shuffled"]])[:, 0]
    assert sorted(everything.tolist()) == [0, 1, 2, 3, 100, 101, 102, 103]  # a permutation of all samples
    assert not torch.equal(r[0]["shuffled"], r[0]["x"])  # and it did move them


@pytest.mark.parametrize("splits", [2, 4])
def test_one_process_emulates_shuffle_bn_per_group(splits, monkeypatch):
    """--bn-splits G in one process: every BatchNorm of both encoders normalises G groups of the batch
    apart (as G GPUs would), and the key of image n comes from the group that the shuffle put it in.
    Checked against plain BatchNorm copies run on each group of the shuffled key batch."""
    args = moco.get_args(["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--bn-splits", str(splits),
                          "--queue-size", "64", "--momentum", "1.0"])  # m = 1: the key encoder stays as it is
    torch.manual_seed(0)
    plain = moco.Encoder("resnet18", 128)
    encoder_q = common.split_batchnorm(copy.deepcopy(plain), splits)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    assert sum(isinstance(m, common.SplitBatchNorm2d) for m in encoder_q.modules()) == 20  # every BN of the trunk
    queue, seen = moco.Queue(128, 64), {}
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.0)
    monkeypatch.setattr(moco, "infonce", lambda q, k, keys, t: seen.setdefault("k", k) is k and q.sum() * 0)  # keep k
    torch.manual_seed(1)
    state = moco.State(encoder_q, encoder_k, queue, optimizer, torch.amp.GradScaler("cpu", enabled=False), None,
                       torch.device("cpu"))
    moco.train_step((im_q, im_k), state, args)
    torch.manual_seed(1)
    perm = torch.randperm(8)  # the permutation train_step drew
    shuffled, expected = im_k[perm], torch.empty(8, 128)
    for g in range(splits):  # group g: the g-th slice of the shuffled batch, through a plain BatchNorm
        rows = slice(g * 8 // splits, (g + 1) * 8 // splits)
        expected[perm[rows]] = F.normalize(copy.deepcopy(plain).train()(shuffled[rows]), dim=1)
    assert torch.allclose(seen["k"], expected, atol=1e-5)
    whole = F.normalize(copy.deepcopy(plain).train()(im_k), dim=1)  # one BatchNorm over the batch: not the same
    assert not torch.allclose(seen["k"], whole, atol=1e-3)


def test_bn_splits_must_leave_two_images_per_group(capsys):
    with pytest.raises(SystemExit):
        moco.get_args(["--batch-size", "8"])  # the default 8 groups would hold one image each
    err = capsys.readouterr().err
    assert "--bn-splits 8" in err and "at least 2 images" in err and "--bn-splits 4: 2 images each" in err
    assert moco.get_args(["--batch-size", "8", "--bn-splits", "1"]).bn_splits == 1


def _ckpt(path):
    return common.load_checkpoint(path)


def test_moco_runs_then_resumes_at_saved_step_with_saved_queue(tmp_path):
    out = tmp_path / "run"
    args = ["moco.py", *TINY, "--bn-splits", "2", "--queue-size", "64", "--epochs", "3", "--output-dir", out, "--save-every", "1"]
    python(*args, "--max-steps", "3")
    first = _ckpt(out / "checkpoint.pth")
    assert first["step"] == 3 and first["queue"]["ptr"].item() == 24
    log = [l for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all("loss" in l for l in log)
    losses = [float(l.split('"loss": ')[1].split(",")[0]) for l in log]
    assert all(0 < x < 20 for x in losses)
    text = python(*args, "--max-steps", "6")  # crosses into epoch 2 (4 steps per epoch)
    assert "resumed from" in text and "at step 3" in text
    second = _ckpt(out / "checkpoint.pth")
    assert second["step"] == 6 and second["queue"]["ptr"].item() == 48
    # The first 24 queued keys are the ones the first run saved; 24 new ones follow.
    assert torch.equal(second["queue"]["keys"][:, :24], first["queue"]["keys"][:, :24])
    assert not torch.equal(second["queue"]["keys"][:, 24:48], first["queue"]["keys"][:, 24:48])
    assert (out / "downstream.pth").exists() and (out / "args.json").exists() and (out / "moco.py").exists()
    down = _ckpt(out / "downstream.pth")
    assert down["method"] == "moco" and down["arch"] == "resnet18" and "layer4.1.bn2.weight" in down["backbone"]
    # and the downstream backbone is the query encoder's, as in the official conversion
    assert torch.equal(down["backbone"]["conv1.weight"], second["encoder_q"]["backbone.conv1.weight"])


def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    script = rank_dump_script(tmp_path, "moco")
    torchrun(2, script, *TINY, "--queue-size", "64", "--max-steps", "3", "--output-dir", tmp_path / "run")
    r0 = assert_ranks_equal(tmp_path, 100)  # query encoder, key encoder, queue
    # two ranks x 4 images x 3 steps went into the queue, gathered from both ranks
    assert r0[2]["ptr"].item() == 24
    assert _ckpt(tmp_path / "run" / "checkpoint.pth")["step"] == 3


def test_bad_batch_size_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="fewer than one global batch"):
        moco.build_data(moco.get_args(["--synthetic-len", "4", "--batch-size", "8", "--bn-splits", "2", "--image-size", "32"]),
                        torch.device("cpu"))
