"""mcl.py: montage geometry, BatchNorm batching as the official code, the loss against a naive
reference, optimizer and schedule formulas, init, export, runs."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import mcl
from conftest import assert_ranks_equal, python, rank_dump_script, torchrun

TINY_MCL = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--synthetic-len", "64", "--workers", "0",
            "--log-every", "1"]


@pytest.mark.parametrize("r,count", [(1, 8), (2, 2), (4, 1), (8, 1)])
def test_montage_puts_every_tile_where_its_label_says(r, count):
    B, t = 8, 4
    tiles = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, t, t).clone()  # tile b is all b
    tiles[:, 1] = torch.arange(t, dtype=torch.float32).view(1, 1, t)  # a ramp, to catch transposed tiles
    perm = torch.randperm(r * r * count)
    canvases, source = mcl.make_montage(tiles, r, count, perm)
    assert canvases.shape == (count, 3, r * t, r * t)
    assert sorted(set(source.tolist())) == list(range(B))  # every level covers the batch
    for s in range(r * r * count):
        c, row, col = s // (r * r), (s % (r * r)) // r, s % r
        cell = canvases[c, :, row * t:(row + 1) * t, col * t:(col + 1) * t]
        assert torch.equal(cell, tiles[source[s]])


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_windows_of_a_canvas_feature_map_are_the_tiles(r):
    """A feature map computed from a canvas (here: average pooling to the window grid) cut into
    windows gives back, window by window, the tile in that slot."""
    B, size, w = 16, 64, 2  # 64 px canvases, 2 x 2 windows (size/32)
    t = size // r
    tiles = torch.rand(B, 3, t, t)
    count = max(1, B // (r * r))
    canvases, source = mcl.make_montage(tiles, r, count, torch.randperm(r * r * count))
    feat = F.avg_pool2d(canvases, kernel_size=t // w)  # (count, 3, r·w, r·w): stride matching the level
    windows = mcl.montage_windows(feat, r)
    assert windows.shape == (count * r * r, 3, w, w)
    assert torch.allclose(windows, F.avg_pool2d(tiles[source], kernel_size=t // w), atol=1e-6)


def test_montage_counts_follow_the_official_rule():
    args = mcl.get_args(["--batch-size", "128"])
    assert args.montages == [128, 32, 8, 4]
    assert [r * r * c for r, c in zip(mcl.RATIOS, args.montages)] == [128, 128, 128, 256]
    with pytest.raises(SystemExit):
        mcl.get_args(["--batch-size", "48"])


def test_tiles_are_shrunk_nearest_and_ratio_one_is_the_batch_in_order():
    torch.manual_seed(0)
    views = [torch.randn(32, 3, 64, 64) for _ in range(4)]
    canvases, plan, sources = mcl.build_montages(views, [32, 8, 2, 1], "nearest")
    assert plan == [(1, 32), (2, 8), (4, 2), (8, 1)] and canvases.shape == (43, 3, 64, 64)
    assert torch.equal(canvases[:32], views[0]) and torch.equal(sources[0], torch.arange(32))
    # F.interpolate(scale_factor=1/r)'s default is nearest: every r-th pixel, as the official code
    first = canvases[32, :, :32, :32]  # ratio 2, montage 0, slot 0
    assert torch.equal(first, views[1][sources[1][0], :, ::2, ::2])
    smooth, _, _ = mcl.build_montages(views, [32, 8, 2, 1], "antialias")
    assert not torch.allclose(smooth[32:], canvases[32:])


def _official_online(online, canvases, plan):
    """The official forward, written from openselfsup/models/mcl.py and necks.py: encoder + FPN on
    the branch's concatenated canvases, then the neck on *every* FPN level of every canvas (level i
    uses map -(i+1)), then each level's slice of canvases."""
    pyramid = online.fpn(online.encoder(canvases))
    out, start = [], 0
    for i, (r, count) in enumerate(plan):
        x = pyramid[-(i + 1)]
        n, c, h, _ = x.shape
        nh = h // (h // r)
        windows = x.reshape(n, c, nh, h // nh, nh, h // nh).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, h // nh, h // nh)
        feat = online.head(windows).reshape(n, nh * nh, -1)
        out.append(feat[start:start + count].reshape(-1, feat.shape[-1]))
        start += count
    return out


def test_online_forward_is_the_official_one_per_branch_and_level():
    torch.manual_seed(0)
    student = mcl.Student("resnet18").train()
    views = [torch.randn(32, 3, 64, 64) for _ in range(8)]
    c1, plan, _ = mcl.build_montages(views[:4], [32, 8, 2, 1], "nearest")
    c2, _, _ = mcl.build_montages(views[4:], [32, 8, 2, 1], "nearest")
    mine = student.online(c1, plan)
    official = _official_online(student.online, c1, plan)
    for a, b in zip(mine, official):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # BatchNorm statistics are per branch: changing branch 2 leaves branch 1's predictions as they are
    preds = student((c1, c2), plan)
    preds_shifted = student((c1, c2 * 3 + 1), plan)
    for a, b in zip(preds[0], preds_shifted[0]):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(preds[1][0], preds_shifted[1][0], atol=1e-3)
    # ... and per level: the head and the predictors are called once per (branch, level)
    calls = []
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in
             (("head", student.online.head), *((f"pred{i}", p) for i, p in enumerate(student.predictors)))]
    student((c1, c2), plan)
    for h in hooks:
        h.remove()
    assert calls.count("head") == 8 and all(calls.count(f"pred{i}") == 2 for i in range(4))


def test_head_on_used_windows_only_sees_its_own_level():
    torch.manual_seed(0)
    online = mcl.Online("resnet18", head_windows="scored").train()
    views = [torch.randn(32, 3, 64, 64) for _ in range(4)]
    c, plan, _ = mcl.build_montages(views, [32, 8, 2, 1], "nearest")
    out = online(c, plan)
    assert [o.shape[0] for o in out] == [32, 32, 32, 64]
    all_windows = mcl.Online("resnet18", head_windows="all").train()
    all_windows.load_state_dict(online.state_dict())
    assert not torch.allclose(all_windows(c, plan)[1], out[1], atol=1e-4)  # other BN statistics


def test_target_uses_p5_of_all_the_branch_montages_as_the_official_code():
    torch.manual_seed(0)
    online = mcl.Online("resnet18").train()
    views = [torch.randn(32, 3, 64, 64) for _ in range(4)]
    c, plan, _ = mcl.build_montages(views, [32, 8, 2, 1], "nearest")
    official = _official_online(online, c, plan)[0]  # level 0 = P5 of the 32 full images, BN over all 43 canvases
    assert torch.allclose(online.forward_p5(c)[:32], official, atol=1e-5)
    assert not torch.allclose(online.forward_p5(c[:32]), official, atol=1e-3)  # the full images alone: other BN


def test_multi_level_loss_equals_naive_per_tile():
    torch.manual_seed(0)
    B, D, T = 4, 8, 1.0
    t_full = [torch.randn(B, D), torch.randn(B, D)]
    sizes = [4, 4, 4, 8]
    preds = [[torch.randn(s, D) for s in sizes] for _ in range(2)]
    sources = [[torch.randint(0, B, (s,)) for s in sizes] for _ in range(2)]
    weights = [0.5, 0.25, 0.125, 0.125]
    total, per_level = mcl.multi_level_loss(preds, sources, t_full, torch.tensor(weights), T)
    naive = [0.0] * 4
    for branch in range(2):
        targets = F.normalize(t_full[1 - branch], dim=1)  # the other branch's full images
        for level in range(4):
            p, src = F.normalize(preds[branch][level], dim=1), sources[branch][level]
            losses = []
            for j in range(len(p)):  # one tile at a time
                logits = [float(p[j] @ targets[n]) / T for n in range(B)]
                losses.append(math.log(sum(math.exp(l) for l in logits)) - logits[src[j]])
            naive[level] += sum(losses) / len(losses) * 2 * T
    assert per_level.tolist() == pytest.approx(naive, rel=1e-5)
    assert total.item() == pytest.approx(sum(w * n for w, n in zip(weights, naive)), rel=1e-5)


def test_loss_under_bf16_autocast_equals_fp32():
    torch.manual_seed(0)
    t_full = [torch.randn(16, 256), torch.randn(16, 256)]
    preds = [[torch.randn(16, 256) for _ in range(4)] for _ in range(2)]
    sources = [[torch.randint(0, 16, (16,)) for _ in range(4)] for _ in range(2)]
    w = torch.tensor([0.5, 0.25, 0.125, 0.125])
    fp32 = mcl.multi_level_loss(preds, sources, t_full, w, 0.2)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = mcl.multi_level_loss(preds, sources, t_full, w, 0.2)[0]
    assert torch.allclose(fp32, bf16, rtol=1e-6, atol=1e-6)


def _rank_worker(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(10 + rank)
    B, D = 4, 8
    t_full = [F.normalize(torch.randn(B, D), dim=1) for _ in range(2)]
    src = torch.arange(B)
    # each tile predicts exactly the other branch's target of its own image: only correct global
    # labels (offset by rank) make this the lowest-loss pairing
    preds = [[t_full[1].clone() for _ in range(4)], [t_full[0].clone() for _ in range(4)]]
    _, per_level = mcl.multi_level_loss(preds, [[src] * 4] * 2, t_full, torch.full((4,), 0.25), 0.05)
    all_t = [common.concat_all_gather(t) for t in t_full]
    expected = sum(F.cross_entropy(all_t[1 - b][rank * B:(rank + 1) * B] @ all_t[1 - b].T / 0.05, src + rank * B) * 0.1
                   for b in range(2))
    torch.save({"per_level": per_level, "expected": expected}, f"{out}/mcl{rank}.pt")
    torch.distributed.destroy_process_group()


def test_labels_are_offset_by_rank(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"mcl{rank}.pt", weights_only=True)
        assert torch.allclose(r["per_level"], r["expected"].expand(4), atol=1e-5)
        assert r["per_level"][0] < 0.5  # the right images were found


def test_official_lars_form_and_parameter_groups():
    torch.manual_seed(0)
    student = mcl.Student("resnet18")
    groups = mcl.official_param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    excluded = {names[id(p)] for p in groups[1]["params"]}
    assert "online.encoder.bn1.weight" in excluded and "online.fpn.lateral.0.1.weight" in excluded
    assert "online.head.convs.1.weight" in excluded and "online.head.mlp.0.bias" in excluded
    # the official regex `(bn|gn)(\d+)?.(weight|bias)` misses these two kinds of norm weights
    assert "online.encoder.layer2.0.downsample.1.weight" not in excluded and "online.head.mlp.1.weight" not in excluded
    assert "predictors.0.1.weight" not in excluded and "online.encoder.layer2.0.downsample.1.bias" in excluded
    # openselfsup form: q = eta·|w| / (|g| + wd·|w|), the lr inside the momentum buffer
    lin = torch.nn.Linear(4, 3, bias=False)
    w0 = lin.weight.detach().clone()
    opt = common.LARS([{"params": [lin.weight]}], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001, form="openselfsup")
    buf = torch.zeros(3, 4)  # the momentum buffer, starting empty
    for lr in (0.5, 0.25):
        opt.param_groups[0]["lr"] = lr
        lin.weight.grad = torch.randn(3, 4)
        g, w = lin.weight.grad.clone(), lin.weight.detach().clone()
        q = 0.001 * w.norm() / (g.norm() + 0.1 * w.norm())
        buf = 0.9 * buf + lr * q * (g + 0.1 * w)
        opt.step()
        assert torch.allclose(lin.weight, w - buf, atol=1e-7)
    assert not torch.equal(lin.weight, w0)


def test_lr_schedule_is_the_official_cosine_times_the_warmup_ramp():
    args = mcl.get_args(["--batch-size", "256", "--epochs", "10", "--warmup-epochs", "2", "--min-lr", "0.01"])
    lrs = mcl.lr_schedule(args, steps_per_epoch=10)  # base lr 1.0, 100 steps, 20 of warm-up
    cos = lambda k: 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * k / 100))
    assert lrs[0] == pytest.approx(cos(0) * 1e-4)
    assert lrs[10] == pytest.approx(cos(10) * (1 - 0.5 * (1 - 1e-4)))
    assert lrs[20] == pytest.approx(cos(20)) and lrs[50] == pytest.approx(cos(50))  # the cosine spans the whole run
    assert lrs[-1] == pytest.approx(cos(99))


def test_init_follows_the_official_code():
    torch.manual_seed(0)
    student = mcl.Student("resnet50")
    assert student.predictors[0][0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert student.predictors[0][0].bias.abs().max() == 0 and student.online.head.mlp[0].bias.abs().max() == 0
    fan_in = student.online.head.mlp[0].in_features
    assert student.online.head.mlp[0].weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    conv = student.online.encoder.layer3[0].conv2  # kaiming fan_in: std sqrt(2 / (C_in·9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (conv.in_channels * 9)), rel=0.05)
    lat = student.online.fpn.lateral[3][0]  # xavier uniform: std sqrt(2 / (fan_in + fan_out))
    assert lat.weight.std().item() == pytest.approx(math.sqrt(2 / (lat.in_channels + lat.out_channels)), rel=0.05)


def test_mcl_runs_and_exports(tmp_path):  # resuming: tests/test_reliability.py
    out = tmp_path / "run"
    python("mcl.py", *TINY_MCL, "--max-steps", "2", "--output-dir", out)
    assert common.load_checkpoint(out / "checkpoint.pth")["step"] == 2
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert all(math.isfinite(x) and x > 0 for x in rec["level_losses"])
    down = common.load_checkpoint(out / "downstream.pth")
    assert down["method"] == "mcl" and down["decoder_cfg"]["levels"] == ["p2", "p3", "p4", "p5"]
    assert "9.weight" in down["region_head_convs"]  # the 4th conv of the region head (conv, BN, ReLU x 4)
    python("eval_dense.py", "--init", out, "--export", "detectron2", tmp_path / "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        d2 = pickle.load(f)["model"]
    convs = down["region_head_convs"]
    for i in range(4):  # MCL's converter: region-head conv i -> the 4conv1fc box head's conv{i+1} (+ .norm)
        assert np.array_equal(d2[f"roi_heads.box_head.conv{i + 1}.weight"], convs[f"{3 * i}.weight"].numpy())
        for p in ("weight", "bias", "running_mean", "running_var"):
            assert np.array_equal(d2[f"roi_heads.box_head.conv{i + 1}.norm.{p}"], convs[f"{3 * i + 1}.{p}"].numpy())
    assert "fpn_output2.norm.weight" in d2 and "res5.1.conv2.norm.weight" in d2
    python("mcl.py", *TINY_MCL, "--save-montage", tmp_path / "m.png", "--output-dir", tmp_path / "m")
    from PIL import Image
    assert Image.open(tmp_path / "m.png").size == (4 * 32, 32)


def test_torchrun_two_processes(tmp_path):
    script = rank_dump_script(tmp_path, "mcl")
    torchrun(2, script, *TINY_MCL[:4], "--batch-size", "64", "--synthetic-len", "128", "--workers", "0",
             "--max-steps", "1", "--output-dir", tmp_path / "run")
    assert_ranks_equal(tmp_path, 100)


def test_save_montage_takes_views_in_any_dtype_and_graph_state(tmp_path):
    """--save-montage --gpu-augment hands the device pipeline's views over as they are: the PNG is
    drawn on the host in fp32 from bf16 views that carry a graph, and shows the de-normalised batch."""
    from PIL import Image
    torch.manual_seed(0)
    args = mcl.get_args(["--batch-size", "32", "--image-size", "32"])
    w = torch.ones((), requires_grad=True)
    views = [(torch.randn(32, 3, 32, 32) * w).bfloat16() for _ in range(8)]
    mcl.save_montage_png(views, args, tmp_path / "m.png")
    png = torch.from_numpy(np.array(Image.open(tmp_path / "m.png"))).permute(2, 0, 1).float()  # (3, 32, 4·32)
    first = views[0][0].detach().float() * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    assert png.shape == (3, 32, 128)
    assert (png[:, :, :32] - (first.clamp(0, 1) * 255).floor()).abs().max() <= 1  # ratio 1: the batch's first image
