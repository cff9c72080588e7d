"""common.py, common.py, common.py: data presets, synthetic scenes, augmentations, networks, schedules, checkpoints."""
import argparse
import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import common


def _args(data, root, **kw):
    return argparse.Namespace(data=data, data_root=str(root), synthetic_len=4, synthetic_size=0, synthetic_style="colour",
                              image_size=32, seed=0, **kw)


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40 % 255, 10, 20)).save(folder / f"img{i}.jpg")


def test_presets_find_their_layouts(tmp_path):
    _write_images(tmp_path / "coco" / "train2017", 3)
    _write_images(tmp_path / "coco" / "unlabeled2017", 2)
    _write_images(tmp_path / "imagenet" / "train" / "n01", 2)
    _write_images(tmp_path / "imagenet" / "train" / "n02", 3)
    _write_images(tmp_path / "flat" / "deep" / "er", 4)
    assert len(common.build_pretrain_dataset(_args("coco", tmp_path), None)) == 3
    assert len(common.build_pretrain_dataset(_args("coco+", tmp_path), None)) == 5
    assert len(common.build_pretrain_dataset(_args("imagenet", tmp_path), None)) == 5
    folder = common.build_pretrain_dataset(_args(str(tmp_path / "flat"), tmp_path), None)
    assert len(folder) == 4 and folder[0].size == (40, 30)
    assert len(common.build_pretrain_dataset(_args("synthetic", tmp_path), None)) == 4


def test_missing_folder_names_folder_and_layout(tmp_path):
    with pytest.raises(SystemExit) as e:  # a message, no traceback
        common.build_pretrain_dataset(_args("coco", tmp_path), None)
    assert str(tmp_path / "coco" / "train2017") in str(e.value) and "train2017/*.jpg" in str(e.value)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "imagenet" / "train" / "n01").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images .* found in .*imagenet/train.*Expected layout"):
        common.build_pretrain_dataset(_args("imagenet", tmp_path), None)


def test_corrupt_image_is_skipped_with_one_warning(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    bad = tmp_path / "imgs" / "img0.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = common.build_pretrain_dataset(_args(str(tmp_path / "imgs"), tmp_path), None)
    with pytest.warns(UserWarning, match="img0.jpg"):
        img = ds[0]
    assert img.getpixel((0, 0))[0] > 20  # img1 (red 40) was returned in its place
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of the same bad file warns no more
        ds[0]


def test_synthetic_is_deterministic_and_splits_differ():
    a, la = common.synthetic_scene(5, seed=1, size=64)
    b, lb = common.synthetic_scene(5, seed=1, size=64)
    c, _ = common.synthetic_scene(6, seed=1, size=64)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(la, lb)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    train = common.SyntheticScenes(3, 64, split="train", with_labels=True)
    val = common.SyntheticScenes(3, 64, split="val", with_labels=True)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(val[0][0]))
    assert val.offset >= 1_000_000 > len(train)


def test_synthetic_labels_sit_on_the_objects_edges():
    """Label boundaries must coincide with strong image edges; a misplaced (transposed) map does not."""
    def edge_ratio(x, label):
        grad = np.abs(np.diff(x, axis=1))  # (H, W-1)
        edge = label[:, 1:] != label[:, :-1]
        return grad[edge].mean() / grad[~edge].mean()
    right, wrong = [], []
    for i in range(10):
        img, label = common.synthetic_scene(i, size=128)
        x = np.asarray(img).astype(np.float32).mean(2)
        right.append(edge_ratio(x, label))
        wrong.append(edge_ratio(x, label.T))
        assert set(np.unique(label)) <= set(range(len(common.SHAPES) + 1))
    assert np.median(right) > 3.0 and np.median(wrong) < 2.0


def test_synthetic_colour_does_not_give_the_class_away():
    """A nearest-class-mean classifier on an object's mean colour is close to chance (1/8)."""
    feats, classes = [], []
    for i in range(300):
        img, label = common.synthetic_scene(i, size=64)
        x = np.asarray(img).astype(np.float32)
        for k in np.unique(label)[1:]:
            feats.append(x[label == k].mean(0))
            classes.append(k)
    feats, classes = np.array(feats), np.array(classes)
    half = len(feats) // 2
    means = np.stack([feats[:half][classes[:half] == k].mean(0) for k in range(1, 9)])
    pred = np.argmin(((feats[half:, None] - means[None]) ** 2).sum(-1), 1) + 1
    assert len(np.unique(classes)) == 8
    assert (pred == classes[half:]).mean() < 0.25


def test_mono_scenes_are_grey_and_a_pixels_grey_does_not_give_the_class_away():
    """--synthetic-style mono: no colour anywhere; every object pixel is one of the two greys, and each
    class shows both in about equal shares, so a pixel's grey tells figure from ground only."""
    dark, total, ground = np.zeros(9), np.zeros(9), []
    for i in range(300):
        img, label = common.synthetic_scene(i, size=64, style="mono")
        x = np.asarray(img).astype(np.float32)
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()  # grey: R = G = B
        grey, fg = x[..., 0], label > 0
        assert set(np.unique(grey[fg])) <= {40.0, 215.0}
        ground.append(grey[~fg].mean())
        np.add.at(dark, label[fg], grey[fg] == 40)
        np.add.at(total, label[fg], 1)
    share = dark[1:] / total[1:]  # per class, the share of its pixels that are dark
    assert (total[1:] > 0).all() and (np.abs(share - 0.5) < 0.15).all(), share
    assert abs(np.mean(ground) - 128) < 3
    with pytest.raises(ValueError, match="mono"):
        common.synthetic_scene(0, size=64, style="grey")


def test_cosine_schedule_warmup_and_ends():
    s = common.cosine_schedule(1.0, 0.0, epochs=10, steps_per_epoch=10, warmup_epochs=2)
    assert len(s) == 100 and s[0] == 0.0 and s[10] == pytest.approx(0.5) and s[20] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.0, abs=1e-3) and all(a >= b for a, b in zip(s[20:], s[21:]))
    per_epoch = common.cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=5, per_step=False)
    assert per_epoch[:5] == [1.0] * 5 and per_epoch[5] == pytest.approx(0.5 + 0.5 * np.cos(np.pi / 4))
    m = common.momentum_schedule(0.99, epochs=1, steps_per_epoch=100)
    assert m[0] == pytest.approx(0.99) and m[-1] > 0.9999


def test_lars_excludes_biases_and_scales_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = common.LARS(common.lars_param_groups(lin), lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.001)
    lin(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    # weight: step = eta * |w| / |g| * g (trust ratio); bias: plain SGD step
    assert torch.allclose(lin.weight, w0 - 0.001 * w0.norm() / gw.norm() * gw, atol=1e-6)
    assert torch.allclose(lin.bias, b0 - gb, atol=1e-6)


def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path):
    path = tmp_path / "ck.pth"
    common.save_atomic({"a": torch.arange(3), "step": 7}, path)
    assert not (tmp_path / "ck.pth.tmp").exists()
    assert common.load_checkpoint(path)["step"] == 7
    torch.save({"bad": argparse.Namespace(x=1)}, path)  # arbitrary objects are refused
    with pytest.raises(Exception):
        common.load_checkpoint(path)


def test_resnet_trunk_shapes_and_torchvision_names():
    import torchvision
    trunk = common.ResNetTrunk("resnet18", pyramid=True)
    feats = trunk(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    missing, unexpected = torchvision.models.resnet18().load_state_dict(trunk.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []


def _losses():
    """Every method's loss (or matching) on random fp32 inputs: name -> callable."""
    import adclr
    import decon
    import densecl
    import moco
    torch.manual_seed(0)
    n = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=1)
    q, k, queue = n(32, 128), n(32, 128), n(128, 4096)
    qf, kf, qg, kg = n(4, 512, 49), n(4, 512, 49), n(4, 128, 49), n(4, 128, 49)
    s, t = torch.randn(4, 64, 7, 7) * 3, torch.randn(4, 64, 7, 7) * 3
    so, to = torch.randn(6, 8, 4096) * 4, torch.randn(2, 8, 4096) * 4
    return {
        "moco infonce": lambda: moco.infonce(q, k, queue, 0.2),
        "densecl infonce": lambda: densecl.infonce(q, k, queue, 0.2),
        "densecl matching": lambda: densecl.match_locations(qf, kf).float(),
        "densecl dense": lambda: densecl.dense_loss(qg, kg, densecl.match_locations(qf, kf), queue, 0.2),
        "slotcon group": lambda: decon.group_loss(s, t, torch.zeros(64), 0.1, 0.07),
        "slotcon slot": lambda: decon.slot_loss(decon.slots(qg.view(4, 128, 7, 7), s, 0.07),
                                                decon.slots(kg.view(4, 128, 7, 7), t, 0.07), s, t, torch.nn.Identity(), 0.2),
        "dino": lambda: adclr.dino_loss(so, to, torch.zeros(4096), 0.1, 0.04),
        "adclr query": lambda: adclr.query_loss(so[:2, :, None], to[:, :, None], torch.zeros(4096), 0.1, 0.04),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_losses_under_bf16_autocast_equal_fp32(name):
    """A loss called inside a bf16 autocast region must give its fp32 value: bf16 matmuls over
    thousands of keys would move it by ~1e-2."""
    fn = _losses()[name]
    fp32 = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fn()
    assert bf16.dtype == torch.float32 and torch.allclose(fp32, bf16, rtol=1e-6, atol=1e-6)


def test_slotcon_lars_form():
    """SlotCon's LARS: d = g + wd·w, q = eta·|w| / |d|, mu = m·mu + q·d, w -= lr·mu."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    opt = common.LARS([{"params": [lin.weight]}], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
    mu = 0
    for lr in (0.5, 0.25):
        opt.param_groups[0]["lr"] = lr
        lin.weight.grad = torch.randn(3, 4)
        w = lin.weight.detach().clone()
        d = lin.weight.grad + 0.1 * w
        mu = 0.9 * mu + 0.001 * w.norm() / d.norm() * d
        opt.step()
        assert torch.allclose(lin.weight, w - lr * mu, atol=1e-7)


def test_lars_with_a_zero_weight_follows_each_official_form():
    """|w| = 0, |g| > 0: OpenSelfSup's trust ratio eta·|w| / (|g| + wd·|w|) is 0 (the weight stays at
    zero); SlotCon's where(|w| > 0, ..., 1) is 1 (the weight moves by lr·g)."""
    for form, moves in (("openselfsup", False), ("slotcon", True)):
        w = torch.nn.Parameter(torch.zeros(3, 4))
        opt = common.LARS([{"params": [w]}], lr=0.5, weight_decay=1e-5, momentum=0.9, eta=0.001, form=form)
        w.grad = torch.ones(3, 4)
        opt.step()
        assert torch.equal(w.detach(), -0.5 * torch.ones(3, 4) if moves else torch.zeros(3, 4)), form
    # |g| = 0, |w| > 0 in OpenSelfSup's form: q = eta / wd, and the step is lr·q·wd·w = lr·eta·w
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = common.LARS([{"params": [w]}], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001, form="openselfsup")
    w.grad = torch.zeros(2, 2)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2, 2), 1 - 0.5 * 0.001))


@pytest.mark.parametrize("module", ["moco", "densecl"])
def test_queue_shorter_than_a_global_batch_is_refused(module, capsys):
    mod = __import__(module)
    with pytest.raises(SystemExit):
        mod.get_args(["--queue-size", "128", "--batch-size", "256"])
    assert "smaller than the global batch" in capsys.readouterr().err


def test_resnet_inits():
    import densecl
    import math
    torch.manual_seed(0)
    conv = common.ResNetTrunk("resnet50", conv_init="fan_in").layer3[0].conv2
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (conv.in_channels * 9)), rel=0.05)
    conv = common.ResNetTrunk("resnet50").layer3[0].conv2  # torchvision: fan_out
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (conv.out_channels * 9)), rel=0.05)
    enc = densecl.Encoder("resnet50", 128)  # DenseCL's neck: convs keep PyTorch's default (kaiming uniform, a=sqrt 5)
    w = enc.dense_head[0].weight
    assert w.abs().max().item() <= 1 / math.sqrt(2048) + 1e-6 and enc.dense_head[0].bias.abs().sum() > 0
    assert enc.head[0].weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.05)


def test_split_batchnorm_is_batchnorm_per_group_with_the_same_state():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    split = common.split_batchnorm(torch.nn.Sequential(copy.deepcopy(bn)), 4)[0]
    assert isinstance(split, common.SplitBatchNorm2d) and split.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(8, 3, 5, 5) * torch.arange(1, 9).view(8, 1, 1, 1)  # groups with different statistics
    groups = [copy.deepcopy(bn) for _ in range(4)]
    expected = torch.empty_like(x)
    for g, b in enumerate(groups):  # group g: images 2g, 2g + 1 (the g-th of 4 consecutive slices)
        expected[2 * g:2 * g + 2] = b(x[2 * g:2 * g + 2])
    assert torch.allclose(split(x), expected, atol=1e-5)
    assert not torch.allclose(bn(x), expected, atol=1e-3)  # one BatchNorm over the batch differs
    for name in ("running_mean", "running_var"):  # moved by the mean of the groups' statistics
        assert torch.allclose(getattr(split, name), torch.stack([getattr(b, name) for b in groups]).mean(0), atol=1e-6)
    split.eval()
    assert torch.allclose(split(x), torch.nn.functional.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                                   split.bias), atol=1e-6)


def test_runs_on_other_data_get_their_own_default_folder():
    # The quick start (synthetic) and a first run on a folder must not meet in runs/moco (#42.2).
    import moco
    assert moco.get_args([]).output_dir == "runs/moco"
    assert moco.get_args(["--data", "/data/my_images"]).output_dir == "runs/moco-my_images"
    assert moco.get_args(["--data", "coco"]).output_dir == "runs/moco-coco"
    assert moco.get_args(["--data", "coco", "--output-dir", "x"]).output_dir == "x"


def test_synthetic_len_with_a_folder_is_said_and_a_partial_last_batch_too(tmp_path, capsys):
    import moco
    with pytest.warns(UserWarning, match="--synthetic-len 64 is ignored with --data"):
        args = moco.get_args(["--data", str(tmp_path), "--synthetic-len", "64"])
    assert args.synthetic_len == common.SYNTHETIC_LEN  # the recorded arguments as before: resumes compare equal
    assert moco.get_args([]).synthetic_len == common.SYNTHETIC_LEN
    common.make_loader(list(range(39)), 32, 0, 0, torch.device("cpu"))
    assert "an epoch is 39 // 32 = 1 steps: 7 of the 39 images sit out each epoch" in capsys.readouterr().out


def test_the_start_line_says_the_precision_in_words():
    assert [common.precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == \
        ["fp32", "bf16 autocast", "fp16 autocast + GradScaler"]


def test_a_samples_seeding_reseeds_the_cpu_generators_only(monkeypatch):
    """SeededSamples seeds each sample's draws from (seed, rank, epoch, index) on the CPU alone:
    torch.manual_seed would also reseed every CUDA generator (and not restore it), so with --workers 0
    the step's device draws (shuffle BN, FPN skip dropout, --gpu-augment) would follow the last sample."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)

    class Draws:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)
    before = torch.get_rng_state()
    a, b = common.SeededSamples(Draws(), 0, rank=0), common.SeededSamples(Draws(), 0, rank=1)
    assert torch.equal(a[(0, 1)], a[(0, 1)]) and not torch.equal(a[(0, 1)], b[(0, 1)])
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []
