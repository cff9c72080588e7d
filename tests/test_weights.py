"""evaluation/weights.py and eval_dense.py's downstream plumbing: the authors' checkpoint layouts (built here with
the key names and nesting the official code saves), all-or-nothing loading, exports, per-configuration
output folders, the VOC list names, the test-time resize."""
import argparse
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
    def folder(argv, sha="a" * 40):
        args = ev.get_args(argv)
        args.init_sha = sha  # main() sets it from the --init file's content
        return ev.default_output_dir(args)
    base = ["--task", "finetune", "--head", "fpn"]
    folders = {folder(["--init", "runs/q/s0/moco", *base]),
               folder(["--init", "runs/q/s1/moco", *base]),  # another run of the same method
               folder(["--init", "runs/q/s0/decon", *base]),
               folder(["--init", "runs/q/s0/decon", *base, "--init-decoder"]),
               folder(["--init", "runs/q/s0/decon", *base, "--data", "voc"]),
               folder(["--init", "runs/q/s0/decon", *base, "--lr", "0.02"]),
               folder(["--init", "runs/q/s0/decon", *base], sha="b" * 40)}  # the same path, other weights
    assert len(folders) == 7
    assert folder(["--init", "x", "--workers", "3"]) == folder(["--init", "x"])


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
        # SlotCon main_pretrain.py: {"args": args, "model": DDP state dict, ...}; downstream takes encoder_k
        "slotcon": {"args": argparse.Namespace(arch="resnet18", batch_size=512), "epoch": 800,
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


def _decon_checkpoint(trunk_state, other_state, decoder, ddp):
    """A DeCon main_pretrain.py checkpoint as its code saves it: {"args", "model", "optimizer",
    "scheduler", "epoch"}, the model's student (_q) and teacher (_k) encoders and decoders, with
    `module.` under DDP. `decoder`: {name: tensor} of the teacher decoder in DeCon's names."""
    p = "module." if ddp else ""
    model = {**_prefixed(other_state, p + "encoder_q."), **_prefixed(trunk_state, p + "encoder_k."),
             **_prefixed({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in decoder.items()}, p + "decoder_q."),
             **_prefixed(decoder, p + "decoder_k."), p + "center": torch.zeros(1, 256), p + "center_dec": torch.zeros(1, 256),
             p + "dec_grouping_k.slot_embed.weight": torch.randn(256, 256)}
    return {"args": argparse.Namespace(arch="resnet18", decoder_downstream_dataset="cityscapes", use_decoder=True),
            "model": model, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3}, "epoch": 800}


@pytest.mark.parametrize("ddp", [True, False], ids=["ddp", "one-gpu"])
def test_decon_checkpoints_bring_the_teacher_encoder_and_decoder(tmp_path, ddp):
    """DeCon's FPN decoder (detectron2's names: fpn_lateral{2-5}, fpn_output2, each with .norm) and its
    FCN decoder (mmsegmentation's convs.{0,1}.conv/.bn), with and without DDP's `module.`, read into
    the segmentation head with every tensor."""
    state, other = _trunk().state_dict(), _trunk(seed=1).state_dict()
    torch.manual_seed(2)
    fpn = common.FPN([64, 128, 256, 512], 256, ["p2"])
    for m in fpn.modules():  # non-trivial statistics, so that a swapped BN shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.data.normal_()
    official = {}
    for i in range(4):
        official[f"fpn_lateral{i + 2}.weight"] = fpn.lateral[i][0].weight.detach()
        official.update(_prefixed(fpn.lateral[i][1].state_dict(), f"fpn_lateral{i + 2}.norm."))
    official["fpn_output2.weight"] = fpn.output["p2"][0].weight.detach()
    official.update(_prefixed(fpn.output["p2"][1].state_dict(), "fpn_output2.norm."))
    assert len([k for k in official if "num_batches" not in k]) == 25
    torch.save(_decon_checkpoint(state, other, official, ddp), tmp_path / "decon_fpn.pth")
    backbone, meta = weights.load_init(str(tmp_path / "decon_fpn.pth"))
    assert all(torch.equal(backbone[k], state[k]) for k in state) and set(backbone) == set(state)
    assert meta["decoder_cfg"] == {"type": "fpn", "in_channels": [64, 128, 256, 512], "out_channels": 256, "levels": ["p2"]}
    args = ev.get_args(["--task", "finetune", "--head", "fpn", "--init-decoder"])
    model = ev.Segmenter("resnet18", "finetune", "fpn", 9, 16, fpn_levels=meta["decoder_cfg"]["levels"])
    ev.load_decoder(model, meta, args)
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(), fpn.state_dict().values()))
    # the FCN decoder (DeCon --decoder-type FCN, Cityscapes setting: 256 channels, dilation 6) -> --head fcn, FCN-D6
    head = ev.FCNHead(512, 256, 9, concat=False, dilation=6, dropout=0.0)
    fcn = {}
    for i in range(2):
        fcn[f"convs.{i}.conv.weight"] = torch.randn_like(head.convs[i][0].weight)
        fcn.update({f"convs.{i}.bn.{k}": torch.rand_like(v) if v.is_floating_point() else v
                    for k, v in head.convs[i][1].state_dict().items()})
    torch.save(_decon_checkpoint(state, other, fcn, ddp), tmp_path / "decon_fcn.pth")
    _, meta = weights.load_init(str(tmp_path / "decon_fcn.pth"))
    assert meta["decoder_cfg"] == {"type": "fcn", "in_channels": 512, "out_channels": 256, "dilation": 6}
    args = ev.get_args(["--task", "finetune", "--head", "fcn", "--fcn-head", "d6", "--init-decoder"])
    model = ev.Segmenter("resnet18", "finetune", "fcn", 9, 16, fcn_head="d6")
    ev.load_decoder(model, meta, args)
    loaded = model.head.convs.state_dict()
    for i in range(2):
        assert torch.equal(loaded[f"{i}.0.weight"], fcn[f"convs.{i}.conv.weight"])
        assert torch.equal(loaded[f"{i}.1.running_var"], fcn[f"convs.{i}.bn.running_var"])
    with pytest.raises(SystemExit, match="--fcn-head d6"):  # an FCN-d8 head cannot take it
        ev.load_decoder(ev.Segmenter("resnet18", "finetune", "fcn", 9, 16, fcn_head="d8"), meta,
                        ev.get_args(["--task", "finetune", "--head", "fcn", "--init-decoder"]))


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


@pytest.mark.parametrize("arch,patch,img_size,meta", [
    ("vit_small", 16, 224, True),  # an adclr.py run at the paper's size
    ("vit_small", 16, 64, True),   # a run at 64 px: timm needs img_size=64 (5 positions, not 197)
    ("vit_small", 8, 224, False),  # a DINO ViT-S/8 file without metadata: the patch read off the tensors
])
def test_timm_export_loads_strictly_with_equal_features(tmp_path, arch, patch, img_size, meta):
    timm = pytest.importorskip("timm")  # requirements-test.txt installs it: CI checks the strict load
    torch.manual_seed(0)
    vit = common.ViT(arch, patch, img_size).eval()
    if meta:
        common.save_downstream(tmp_path / "downstream.pth", "adclr", arch, vit, extra={"patch_size": patch, "img_size": img_size})
        init = tmp_path
    else:
        torch.save(vit.state_dict(), tmp_path / "dino_deitsmall8_pretrain.pth")
        init = tmp_path / "dino_deitsmall8_pretrain.pth"
    said = python("eval_dense.py", "--init", init, "--arch", arch, "--export", "timm", tmp_path / "timm.pth")
    size = f", img_size={img_size}" if img_size != 224 else ""
    hint = f"timm.create_model('{arch}_patch{patch}_224', num_classes=0{size})"
    assert hint in said
    model = eval(hint, {"timm": timm}).eval()  # exactly the printed call
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), vit(x), atol=1e-4)


def test_timm_export_names_what_it_cannot_do(tmp_path):
    common.save_downstream(tmp_path / "downstream.pth", "adclr", "vit_micro", common.ViT("vit_micro", 16, 224),
                           extra={"patch_size": 16, "img_size": 224})
    with pytest.raises(SystemExit, match="vit_micro with patch 16 has no timm model; timm has vit_tiny/16, vit_small/16"):
        weights.export(argparse.Namespace(init=str(tmp_path), arch=None, patch_size=None,
                                          export=("timm", str(tmp_path / "t.pth"))))
    torch.save(common.ViT("vit_small", 8, 224).state_dict(), tmp_path / "s8.pth")  # no metadata, read as patch 16:
    with pytest.raises(SystemExit, match="8-pixel patches, the model 16: pass --patch-size 8"):  # not "pass --arch"
        weights.load_backbone(common.ViT("vit_small", 16, 224), torch.load(tmp_path / "s8.pth", weights_only=True), "vit_small", {}, "s8.pth")


def test_vit_fine_tunes_with_a_simple_feature_pyramid(tmp_path):
    python("eval_dense.py", "--init", "random", "--arch", "vit_micro", "--patch-size", "8", "--task", "finetune",
           "--head", "fpn", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train", "8", "--synthetic-val", "4",
           "--iters", "2", "--batch-size", "4", "--workers", "0", "--output-dir", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["arch"] == "vit_micro" and m["head"] == "fpn" and 0 <= m["mIoU"] <= 100


def test_val_resize_scores_at_the_label_size():
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    x, y = seg_data.ValTransform([64, 1024])(img, np.ones((30, 40), np.uint8))
    assert tuple(x.shape) == (3, 64, 85) and tuple(y.shape) == (30, 40)
