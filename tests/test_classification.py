"""eval_dense.py --task knn | linear (evaluation/classification.py): DINO's k-NN vote against a plain
loop, each paper's linear protocol (schedule, features, init, frozen backbone), whole runs on an
ImageNet-layout tree and on the synthetic scenes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import eval_dense as ev
from conftest import python
from evaluation import classification as cls


def knn_plain(train_f, train_y, test_f, test_y, k, T, C):
    """DINO's knn_classifier, one test image at a time."""
    top1 = top5 = 0
    for f, y in zip(test_f, test_y):
        sims = [(float(f @ g), int(l)) for g, l in zip(train_f, train_y)]
        nearest = sorted(sims, key=lambda s: -s[0])[:k]
        votes = [0.0] * C
        for s, l in nearest:
            votes[l] += math.exp(s / T)
        ranked = sorted(range(C), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:min(5, k)]
    return 100 * top1 / len(test_f), 100 * top5 / len(test_f)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_vote_equals_a_plain_loop(k):
    torch.manual_seed(0)
    C = 7
    train_f, test_f = F.normalize(torch.randn(120, 16), dim=1), F.normalize(torch.randn(45, 16), dim=1)
    train_y, test_y = torch.randint(0, C, (120,)), torch.randint(0, C, (45,))
    train_f[:60] += 0.8 * F.one_hot(train_y[:60], 16).float()  # some structure, so accuracy is not at chance
    train_f = F.normalize(train_f, dim=1)
    ours = cls.knn_classify(train_f, train_y, test_f, test_y, k, 0.07, C, chunk=8)  # chunks: 45 is no multiple of 8
    assert ours == pytest.approx(knn_plain(train_f, train_y, test_f, test_y, k, 0.07, C))


def test_linear_protocol_defaults_and_schedules():
    a = ev.get_args(["--task", "linear"])
    cls.defaults(a, "resnet50")  # MoCo's main_lincls.py
    assert (a.linear_protocol, a.epochs, a.batch_size, a.lr, a.n_last_blocks, a.avgpool_patchtokens) == ("moco", 100, 256, 30.0, 1, "off")
    assert [cls.linear_lr(e, a) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    a = ev.get_args(["--task", "linear"])
    cls.defaults(a, "vit_small")  # DINO's eval_linear.py
    assert (a.linear_protocol, a.batch_size, a.lr, a.n_last_blocks, a.avgpool_patchtokens) == ("dino", 1024, 0.004, 4, "off")
    assert [cls.linear_lr(e, a) for e in (0, 50, 99)] == pytest.approx(  # CosineAnnealingLR(T_max=100, eta_min=0)
        [0.004, 0.002, 0.004 * 0.5 * (1 + math.cos(math.pi * 99 / 100))])
    a = ev.get_args(["--task", "linear", "--batch-size", "512"])
    cls.defaults(a, "vit_base")
    assert (a.n_last_blocks, a.avgpool_patchtokens, a.lr) == (1, "on", 0.002)


def test_vit_features_are_the_last_blocks_cls_after_the_last_norm():
    torch.manual_seed(0)
    vit = common.ViT("vit_micro", 8, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(cls.features(vit, x), vit(x)[:, 0], atol=1e-6)  # k-NN: the [CLS] token
        f = cls.features(vit, x, n_last_blocks=2, avgpool=True)  # (2, 96·3)
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1), vit.embed(x)], 1) + vit.pos_for(4, 4)
        outs = []
        for blk in vit.blocks:
            tokens = blk(tokens)
            outs.append(vit.norm(tokens))
    assert f.shape == (2, 96 * 3)
    assert torch.allclose(f, torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(1)], 1), atol=1e-6)


def _imagenet_tree(root, per_class=6):
    """train/ and val/ with three classes of one colour each (and an unreadable file in val)."""
    for split, n in (("train", per_class), ("val", 3)):
        for c, colour in enumerate(("red", "green", "blue")):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                shade = Image.new("RGB", (48, 40), colour)
                shade.paste(Image.new("RGB", (10, 10), "white"), (i * 3, i * 2))
                shade.save(root / split / f"class{c}" / f"{i}.jpg")
    (root / "val" / "class0" / "broken.jpg").write_bytes(b"not a jpeg")


def test_knn_and_linear_on_an_imagenet_tree_resume_and_keep_the_backbone_frozen(tmp_path):
    _imagenet_tree(tmp_path / "imagenet")
    (tmp_path / "run").mkdir()
    torch.manual_seed(0)
    common.save_downstream(tmp_path / "run" / "downstream.pth", "moco", "resnet18", common.ResNetTrunk("resnet18"))
    flags = ["--init", tmp_path / "run", "--data", tmp_path / "imagenet", "--crop-size", "32", "--workers", "0"]
    out = python("eval_dense.py", *flags, "--task", "knn", "--k", "3", "--output-dir", tmp_path / "knn")
    m = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert m["top1"] == 100.0 and m["val_images"] == 9 and "skipping unreadable image" in out  # colour separates them
    linear = [*flags, "--task", "linear", "--epochs", "2", "--batch-size", "6", "--output-dir", tmp_path / "lin"]
    python("eval_dense.py", *linear)
    first = json.loads((tmp_path / "lin" / "metrics.json").read_text())
    assert first["protocol"] == "moco" and first["lr"] == pytest.approx(30 * 6 / 256) and 0 <= first["top1"] <= 100
    again = python("eval_dense.py", *linear)  # finished: resumes at the last step, evaluates the same classifier
    assert "resumed from" in again and json.loads((tmp_path / "lin" / "metrics.json").read_text())["top1"] == first["top1"]
    # the backbone never moves: BatchNorm statistics and weights as loaded
    args = ev.get_args([str(a) for a in linear])
    cls.defaults(args, "resnet18")
    backbone, meta = ev.weights.load_init(str(tmp_path / "run"))
    net = cls.build_backbone(args, backbone, meta, "resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    args.output_dir, args.init_sha = str(tmp_path / "lin2"), "x"
    common.write_run_record(tmp_path / "lin2", args)
    cls.run_linear(args, net, tmp_path / "lin2", torch.device("cpu"), None, common.JsonLog(tmp_path / "lin2" / "log.jsonl"))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_synthetic_image_label_is_the_largest_object():
    _, label = common.synthetic_scene(3, 0, 64)
    counts = np.bincount(label.ravel(), minlength=9)
    assert cls.largest_object(label) == int(np.argmax(counts[1:])) and counts[1 + cls.largest_object(label)] > 0
    ds = cls.SyntheticImages(40, 64, 0, "train", cls.transforms(64, False))
    labels = [ds[i][1] for i in range(40)]
    assert len(set(labels)) >= 5 and all(0 <= y < 8 for y in labels)


def test_a_bad_classification_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder goes below runs/eval here
    with pytest.raises(SystemExit) as stop:
        ev.main(["--task", "knn", "--data", str(tmp_path / "nowhere")])
    assert stop.value.code == 2  # argparse: the message names the layout
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir()
    for task in ("knn", "linear"):  # an explicit folder and the default one: neither is left behind
        for out in ([], ["--output-dir", str(tmp_path / "x")]):
            with pytest.raises(SystemExit, match=r"no images in .*train/<class>/\*"):
                ev.main(["--task", task, "--arch", "resnet18", "--data", str(tmp_path / "flat"), *out])
    assert not (tmp_path / "x").exists() and not Path("runs").exists()


def test_a_data_path_names_one_flat_evaluation_folder():
    """--data /a/b/imagenet gives runs/eval/<init>-<task>-imagenet-<hash>: one folder, no nesting."""
    args = ev.get_args(["--task", "knn", "--data", str(Path(__file__).parent)])
    args.init_sha = "random"
    name = ev.default_output_dir(args)
    assert Path(name).parent == Path("runs/eval") and name.startswith("runs/eval/random-knn-tests-"), name
