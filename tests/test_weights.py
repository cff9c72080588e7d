"""weights.py and eval_dense.py's downstream plumbing: the authors' checkpoint layouts (built here with
the key names and nesting the official code saves), all-or-nothing loading, exports, per-configuration
output folders, the VOC list names, the test-time resize."""
import argparse
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_dense as ev
import mcl
from evaluation import seg_data
from evaluation import weights
from conftest import python


def _trunk(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    return common.ResNetTrunk(arch)


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def test_default_output_folder_is_unique_per_configuration():
    base = ["--task", "finetune", "--head", "fpn"]
    folders = {ev.get_args(["--init", "runs/q/s0/moco", *base]).output_dir,
               ev.get_args(["--init", "runs/q/s1/moco", *base]).output_dir,  # another run of the same method
               ev.get_args(["--init", "runs/q/s0/decon", *base]).output_dir,
               ev.get_args(["--init", "runs/q/s0/decon", *base, "--init-decoder"]).output_dir,
               ev.get_args(["--init", "runs/q/s0/decon", *base, "--data", "voc"]).output_dir,
               ev.get_args(["--init", "runs/q/s0/decon", *base, "--lr", "0.02"]).output_dir}
    assert len(folders) == 6
    assert ev.get_args(["--init", "x", "--workers", "3"]).output_dir == ev.get_args(["--init", "x"]).output_dir


def _layouts(tmp_path):
    """One file per official layout, each holding the same ResNet-18 backbone where the code keeps it."""
    trunk = _trunk()
    state = trunk.state_dict()
    other = _trunk(seed=1).state_dict()  # a second network (a key encoder), to catch taking the wrong one
    head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.zeros(512), "fc.2.weight": torch.randn(128, 512)}
    files = {
        # MoCo main_moco.py: model.state_dict() under DDP: module.encoder_q/encoder_k (torchvision + fc MLP), queue
        "moco": {"epoch": 200, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": []},
                 "state_dict": {**_prefixed({**state, **head}, "module.encoder_q."),
                                **_prefixed({**other, **head}, "module.encoder_k."),
                                "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        # DenseCL (OpenSelfSup, mmcv save_checkpoint): encoder_q = [backbone, neck]; model.backbone is encoder_q[0]
        "densecl": {"meta": {"epoch": 800, "mmcv_version": "0.4.3", "config": "..."},
                    "state_dict": {**_prefixed(state, "encoder_q.0."), **_prefixed(state, "backbone."),
                                   **_prefixed(other, "encoder_k.0."), "encoder_q.1.mlp.0.weight": torch.randn(4, 512),
                                   "queue": torch.randn(128, 64), "queue2": torch.randn(128, 64)}},
        # DenseCL's tools/extract_backbone_weights.py: {"state_dict": backbone without the prefix, "author"}
        "densecl-converted": {"state_dict": dict(state), "author": "DenseCL"},
        # SlotCon main_pretrain.py: {"opt": args, "model": DDP state dict, ...}; downstream takes encoder_k
        "slotcon": {"opt": argparse.Namespace(arch="resnet18", batch_size=512), "epoch": 800,
                    "model": {**_prefixed(other, "module.encoder_q."), **_prefixed(state, "module.encoder_k."),
                              "module.center": torch.zeros(1, 256)},
                    "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3}},
        # DINO main_dino.py: {"student": DDP, "teacher": plain, "args": Namespace, ...}
        "dino": {"args": argparse.Namespace(arch="vit_small"), "epoch": 100,
                 "student": _prefixed(common.ViT("vit_micro", 16, 224).state_dict(), "module.backbone."),
                 "teacher": {**_prefixed(common.ViT("vit_micro", 16, 224).state_dict(), "backbone."),
                             "head.last_layer.weight_g": torch.ones(64, 1)}},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(obj, paths[name])
    return paths, state, files["dino"]["teacher"]


def test_every_official_layout_reads_the_right_backbone(tmp_path):
    paths, state, dino_teacher = _layouts(tmp_path)
    for name in ("moco", "densecl", "densecl-converted", "slotcon"):
        backbone, meta = weights.load_init(str(paths[name]))
        assert meta["arch"] == "resnet18", name
        assert set(backbone) == set(state) and all(torch.equal(backbone[k], state[k]) for k in state), name
    vit, meta = weights.load_init(str(paths["dino"]))
    assert meta["arch"] == "vit_micro" and torch.equal(vit["pos_embed"], dino_teacher["backbone.pos_embed"])
    net = common.ViT("vit_micro", 16, 224)
    weights.load_backbone(net, vit, "vit_micro", meta, "dino")  # strict: every tensor


def test_mcl_layout_brings_fpn_and_region_head_and_exports_them(tmp_path):
    """MCL's OpenSelfSup checkpoint: backbone, FPN (mmcv lateral_convs/fpn_convs) and the region
    head's cls_convs, mapped onto common.FPN and mcl.RegionHead names, then to detectron2's."""
    torch.manual_seed(0)
    online = mcl.Online("resnet18")
    state = {**_prefixed(online.encoder.state_dict(), "backbone."), **_prefixed(online.encoder.state_dict(), "encoder_q.0.")}
    for i in range(4):
        lat, out = online.fpn.lateral[i], online.fpn.output[f"p{i + 2}"]
        state.update(_prefixed(lat[0].state_dict(), f"encoder_q.1.lateral_convs.{i}.conv."))
        state.update(_prefixed(lat[1].state_dict(), f"encoder_q.1.lateral_convs.{i}.bn."))
        state.update(_prefixed(out[0].state_dict(), f"encoder_q.1.fpn_convs.{i}.conv."))
        state.update(_prefixed(out[1].state_dict(), f"encoder_q.1.fpn_convs.{i}.bn."))
        state.update(_prefixed(online.head.convs[3 * i].state_dict(), f"encoder_q.2.cls_convs.{i}.conv."))
        state.update(_prefixed(online.head.convs[3 * i + 1].state_dict(), f"encoder_q.2.cls_convs.{i}.bn."))
    state["encoder_q.2.mlp.0.weight"] = torch.randn(2048, 256)
    torch.save({"meta": {"epoch": 100}, "state_dict": state}, tmp_path / "mcl.pth")
    backbone, meta = weights.load_init(str(tmp_path / "mcl.pth"))
    fpn = common.FPN(online.encoder.channels, 256)
    fpn.load_state_dict(meta["decoder"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fpn.state_dict().values(), online.fpn.state_dict().values()))
    online.head.convs.load_state_dict(meta["region_head_convs"], strict=True)
    python("eval_dense.py", "--init", tmp_path / "mcl.pth", "--export", "detectron2", tmp_path / "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        d2 = pickle.load(f)["model"]
    assert np.array_equal(d2["fpn_lateral3.weight"], online.fpn.lateral[1][0].weight.detach().numpy())
    assert np.array_equal(d2["roi_heads.box_head.conv4.norm.running_var"], online.head.convs[10].running_var.numpy())


def test_a_partial_match_is_refused_never_exported(tmp_path):
    state = _trunk().state_dict()
    torch.save({"state_dict": _prefixed(state, "module.encoder.")}, tmp_path / "odd.pth")  # an unknown prefix
    with pytest.raises(SystemExit, match="does not fit a resnet50"):
        weights.export(argparse.Namespace(init=str(tmp_path / "odd.pth"), arch="resnet50",
                                          export=("detectron2", str(tmp_path / "x.pkl"))))
    assert not (tmp_path / "x.pkl").exists()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(SystemExit, match="1 missing tensors"):
        weights.export(argparse.Namespace(init=str(tmp_path / "short.pth"), arch="resnet18",
                                          export=("torchvision", str(tmp_path / "x.pth"))))


def test_timm_export_loads_strictly_with_equal_features(tmp_path):
    vit = common.ViT("vit_small", 16, 224).eval()
    common.save_downstream(tmp_path / "downstream.pth", "adclr", "vit_small", vit, extra={"patch_size": 16, "img_size": 224})
    python("eval_dense.py", "--init", tmp_path, "--export", "timm", tmp_path / "timm.pth")
    state = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert torch.equal(state["blocks.11.mlp.fc2.weight"], vit.blocks[11].mlp.fc2.weight)
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed: the strict load into timm's model is not checked")
    import timm
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), vit(x), atol=1e-4)


def test_vit_fine_tunes_with_a_simple_feature_pyramid(tmp_path):
    python("eval_dense.py", "--init", "random", "--arch", "vit_micro", "--patch-size", "8", "--task", "finetune",
           "--head", "fpn", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train", "8", "--synthetic-val", "4",
           "--iters", "2", "--batch-size", "4", "--workers", "0", "--output-dir", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["arch"] == "vit_micro" and m["head"] == "fpn" and 0 <= m["mIoU"] <= 100


@pytest.mark.parametrize("list_name,expected", [("trainaug.txt", 3), ("train_aug.txt", 3), ("aug.txt", 4)])
def test_voc_aug_list_names(tmp_path, list_name, expected, capsys):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "SegmentationClassAug").mkdir()
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Segmentation" / list_name).write_text("a\nc\nd\n" if list_name != "aug.txt" else "c\nd\n")
    pairs, _, _ = seg_data.seg_pairs("voc", tmp_path, "train")
    assert len(pairs) == (expected if list_name != "aug.txt" else 4)  # aug.txt: the extra images, plus train.txt
    assert f"{list_name}, {len(pairs)} images" in capsys.readouterr().out


def test_val_resize_scores_at_the_label_size():
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    x, y = seg_data.ResizedVal(64, 1024)(img, np.ones((30, 40), np.uint8))
    assert tuple(x.shape) == (3, 64, 85) and tuple(y.shape) == (30, 40)
    xs, ys, sizes = seg_data.pad_collate([(x, y), seg_data.val_transform(img, np.ones((30, 40), np.uint8))])
    assert xs.shape[-2:] == (64, 96) and ys.shape[-2:] == (30, 40) and sizes == [((64, 85), (30, 40)), ((30, 40), (30, 40))]
