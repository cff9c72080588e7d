"""decon_densecl.py: DeCon over DenseCL. Heads and queues, the loss against densecl.py's, runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import decon_densecl as dd
import densecl
from conftest import TINY, assert_ranks_equal, python, rank_dump_script, torchrun


def test_heads_queues_and_weights():
    args = dd.get_args(["--arch", "resnet18", "--deep-supervision", "--queue-size", "1024"])
    net = dd.Network(args)
    assert len(net.heads) == 5 and net.heads[0].glob is not None and all(h.glob is None for h in net.heads[1:])
    assert [h.dense[0].in_channels for h in net.heads] == [512, 256, 256, 256, 256]
    assert dd.head_weights(args, 5) == [0.5] + [0.125] * 4
    outs = net(torch.randn(2, 3, 64, 64))
    assert [o[2].shape for o in outs] == [(2, 128, 4), (2, 128, 256), (2, 128, 64), (2, 128, 16), (2, 128, 4)]
    with pytest.raises(SystemExit):  # a queue shorter than one global batch
        dd.get_args(["--queue-size", "128", "--batch-size", "256"])


def test_encoder_head_loss_is_densecls():
    """The encoder head's loss equals densecl.py's (1 - lambda) global + lambda dense on the same tensors."""
    torch.manual_seed(0)
    B, C, D, S2, K = 3, 16, 8, 9, 40
    feats = [torch.randn(B, C, S2) for _ in range(2)]
    globs = [torch.randn(B, D) for _ in range(2)]
    grids = [torch.randn(B, D, S2) for _ in range(2)]
    gq, dq = dd.Queue(D, K), torch.nn.ModuleList([dd.Queue(D, K)])
    args = dd.get_args(["--decoder", "none", "--arch", "resnet18", "--queue-size", "1024"])
    total, per_head, gk, dk = dd.decon_losses([(feats[0], globs[0], grids[0])], [(feats[1], globs[1], grids[1])],
                                              gq, dq, [1.0], args)
    n = lambda t: F.normalize(t, dim=1)
    match = densecl.match_locations(n(feats[0]), n(feats[1]))
    ref = 0.5 * densecl.infonce(n(globs[0]), n(globs[1]), gq.keys, 0.2) + \
        0.5 * densecl.dense_loss(n(grids[0]), n(grids[1]), match, dq[0].keys, 0.2)
    assert total.item() == pytest.approx(ref.item(), rel=1e-5) and per_head.shape == (1,)
    assert torch.allclose(gk, n(globs[1])) and torch.allclose(dk[0], n(grids[1].mean(2)))


@pytest.mark.parametrize("flags", [[], ["--decoder", "fcn"], ["--encoder-loss-weight", "0", "--deep-supervision"]])
def test_runs_with_finite_losses_and_exports_the_decoder(tmp_path, flags):
    out = tmp_path / "run"
    python("decon_densecl.py", *TINY, "--bn-splits", "2", "--queue-size", "64", "--max-steps", "2", "--output-dir", out, *flags)
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert math.isfinite(rec["loss"]) and all(math.isfinite(x) for x in rec["head_losses"])
    down = common.load_checkpoint(out / "downstream.pth")
    ck = common.load_checkpoint(out / "checkpoint.pth")
    assert down["method"] == "decon-densecl" and down["decoder"] is not None
    assert ck["dense_queues"]["0.ptr"].item() == 16  # 2 steps x 8 images


def test_torchrun_two_processes(tmp_path):
    script = rank_dump_script(tmp_path, "decon_densecl")
    torchrun(2, script, *TINY, "--queue-size", "64", "--max-steps", "2", "--output-dir", tmp_path / "run")
    assert_ranks_equal(tmp_path, 100)
