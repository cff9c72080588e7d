"""Weights in and out: this project's downstream.pth, the authors' own released checkpoints, and the
files detectron2, torchvision and timm load. Used by eval_dense.py (--init, --export).

Layouts read (key names and nesting as the official code saves them, read from that code):

| layout | top level | backbone keys | also read |
|---|---|---|---|
| this project | `{"format": "dense-ssl-downstream-v1", "backbone", "decoder", ...}` | torchvision names | decoder, MCL region-head convs |
| MoCo (main_moco.py) | `{"epoch", "arch", "state_dict", "optimizer"}` | `module.encoder_q.*` (the query encoder) | - |
| OpenSelfSup (DenseCL, MCL; mmcv) | `{"meta", "state_dict", "optimizer"}` | `backbone.*` (the online / query encoder) | MCL: FPN `encoder_q.1.*`, region head `encoder_q.2.cls_convs.*` |
| DenseCL converted (extract_backbone_weights.py) | `{"state_dict", "author"}` | torchvision names | - |
| SlotCon (main_pretrain.py) | `{"args", "model", "optimizer", "scheduler", "epoch"}` | `[module.]encoder_k.*` (the teacher) | - |
| DeCon (its SlotCon fork) | as SlotCon | `[module.]encoder_k.*` (the teacher) | the teacher decoder `decoder_k.*`: FPN (detectron2 names) or FCN (mmsegmentation's) |
| DINO / ADCLR-PQCL (main_dino.py) | `{"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}` | `teacher`'s `backbone.*` | - |
| a plain state dict | tensors | torchvision or timm/DINO names (`module.` dropped) | - |

`module.` is the DistributedDataParallel prefix: a one-GPU checkpoint has none, and reads the same.
Whatever the layout, every tensor of the backbone must be found: a partial match is refused, never
exported or evaluated.
"""
import argparse
import hashlib
import pickle
import re
from pathlib import Path

import torch

import common

RESNET_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34/50", (3, 4, 23, 3): "resnet101"}


def read_checkpoint(path):
    """torch.load with weights_only=True, allowing argparse.Namespace (SlotCon and DINO store their
    arguments as one): a plain record of values, no code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return common.load_checkpoint(path)
    except common.CheckpointError as e:
        raise SystemExit(f"--init {path}: cannot be read as a checkpoint ({e.why}). Give a run folder, a "
                         f"downstream.pth, an official checkpoint (docs/downstream.md: Use the authors' weights) "
                         f"or 'random'.") from None


def infer_arch(state):
    """The architecture a backbone state dict belongs to: resnet18/34/50/101 or a ViT (None if unknown)."""
    if "cls_token" in state and "pos_embed" in state:
        dim = state["cls_token"].shape[-1]
        return {96: "vit_micro", 192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(dim)
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    arch = RESNET_DEPTHS.get(blocks)
    if arch == "resnet34/50":
        arch = "resnet50" if "layer1.0.conv3.weight" in state else "resnet34"
    return arch


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _mmcv_fpn(state, prefix):
    """OpenSelfSup's FPN (mmcv ConvModules: lateral_convs.i / fpn_convs.i with .conv and .bn) in
    common.FPN's names (lateral.i.0/1, output.p{i+2}.0/1)."""
    out = {}
    for k, v in _strip(state, prefix).items():
        m = re.match(r"(lateral_convs|fpn_convs)\.(\d)\.(conv|bn)\.(.+)", k)
        if m:
            kind, i, layer, param = m.groups()
            head = f"lateral.{i}" if kind == "lateral_convs" else f"output.p{int(i) + 2}"
            out[f"{head}.{0 if layer == 'conv' else 1}.{param}"] = v
    return out


def _mmcv_region_head(state, prefix):
    """MCL's region-head convs (cls_convs.i.conv/.bn) in mcl.RegionHead.convs' names (3i / 3i+1)."""
    out = {}
    for k, v in _strip(state, prefix).items():
        m = re.match(r"cls_convs\.(\d)\.(conv|bn)\.(.+)", k)
        if m:
            i, layer, param = m.groups()
            out[f"{3 * int(i) + (0 if layer == 'conv' else 1)}.{param}"] = v
    return out


def _decon_decoder(state, args, path):
    """The DeCon authors' teacher decoder (`decoder_k.*`) in this project's names, and its config:
    their FPN is detectron2's (fpn_lateral{2-5}, fpn_output{2-5}, each conv with a `.norm`; only
    fpn_output2 is kept for DeCon-SL) -> common.FPN (lateral.i.0/1, output.pN.0/1); their FCN is
    mmsegmentation's FCNHead convs (convs.{0,1}.conv / .bn) -> decon.fcn_decoder's (0/1, 3/4), its
    dilation from the checkpoint's args (decoder_downstream_dataset: cityscapes 6, ade20k 1).
    (None, None) when the checkpoint has no decoder (SlotCon)."""
    if not state:
        return None, None
    out = {}
    if any(k.startswith("fpn_") for k in state):
        for k, v in state.items():
            m = re.match(r"fpn_(lateral|output)(\d)\.(norm\.)?(.+)", k)
            if not m:
                raise SystemExit(f"--init {path}: unknown key decoder_k.{k} in a DeCon FPN decoder")
            kind, level, norm, param = m.groups()
            head = f"lateral.{int(level) - 2}" if kind == "lateral" else f"output.p{level}"
            out[f"{head}.{1 if norm else 0}.{param}"] = v
        levels = sorted({k.split(".")[1] for k in out if k.startswith("output.")})
        in_channels = [out[f"lateral.{i}.0.weight"].shape[1] for i in range(4)]
        return out, {"type": "fpn", "in_channels": in_channels, "out_channels": out["lateral.0.0.weight"].shape[0],
                     "levels": levels}
    for k, v in state.items():
        m = re.match(r"convs\.(\d)\.(conv|bn)\.(.+)", k)
        if not m:
            raise SystemExit(f"--init {path}: unknown key decoder_k.{k} in a DeCon FCN decoder")
        i, layer, param = m.groups()
        out[f"{3 * int(i) + (0 if layer == 'conv' else 1)}.{param}"] = v
    dataset = getattr(args, "decoder_downstream_dataset", None)
    if dataset not in ("cityscapes", "ade20k"):
        raise SystemExit(f"--init {path}: an FCN decoder whose dilation the checkpoint's args do not give "
                         f"(decoder_downstream_dataset: {dataset!r}; DeCon builds cityscapes at 6, ade20k at 1)")
    return out, {"type": "fcn", "in_channels": out["0.weight"].shape[1], "out_channels": out["0.weight"].shape[0],
                 "dilation": 6 if dataset == "cityscapes" else 1}


def init_file(init):
    """The file --init names: itself, or a run folder's downstream.pth; a clear error if it is missing."""
    path = Path(init)
    if path.is_dir():
        path = path / "downstream.pth"
    ckpt = path.with_name("checkpoint.pth")
    if path.name == "downstream.pth" and not path.is_file() and ckpt.is_file():  # a run stopped before its end
        try:
            step = f"--max-steps {torch.load(ckpt, mmap=True, weights_only=True)['step']}"
        except Exception:
            step = "--max-steps set to its step"
        raise SystemExit(f"--init {init}: {path} does not exist: the run stopped before its end (its checkpoint "
                         f"{ckpt} is there). Rerun the run's command (the arguments are in {ckpt.parent}/args.json) "
                         f"with {step}: it resumes and writes {path} without training further; without "
                         f"--max-steps it finishes the run.")
    if not path.is_file():
        raise SystemExit(f"--init {init}: {path} does not exist. Give a run folder (with downstream.pth: the run "
                         f"writes it when it finishes), a downstream.pth, an official checkpoint (docs/downstream.md: "
                         f"Use the authors' weights) or 'random'.")
    return path


def init_digest(init):
    """The content hash (SHA-1) of the file --init names ('random' for a random init): the identity of
    the weights an evaluation starts from, so that new weights under an old path never resume an old
    evaluation."""
    if init == "random":
        return "random"
    digest = hashlib.sha1()
    with open(init_file(init), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_init(init):
    """(backbone state dict or None, metadata) for --init: `random`, a run folder, this project's
    downstream.pth, or one of the official layouts above (detected from its keys)."""
    if init == "random":
        return None, {"method": "random"}
    path = init_file(init)
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise SystemExit(f"--init {init}: {path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    if obj.get("format") == "dense-ssl-downstream-v1":
        return obj["backbone"], obj
    if "step" in obj and "args" in obj:  # one of this project's training checkpoints: use its sibling
        return load_init(str(path.parent / "downstream.pth"))
    meta = {"path": str(path)}
    if "teacher" in obj and isinstance(obj["teacher"], dict):  # DINO / ADCLR (PQCL): the teacher
        teacher = {k.removeprefix("module."): v for k, v in obj["teacher"].items()}
        return _found(_strip(teacher, "backbone."), dict(meta, method="dino-layout (teacher)"), path)
    model = obj.get("model")
    if isinstance(model, dict) and any(k.split(".")[0] == "encoder_k" or k.startswith("module.encoder_k.") for k in model):
        # SlotCon / DeCon (main_pretrain.py): the teacher, `module.` under DDP, without it on one GPU
        prefix = "module." if any(k.startswith("module.encoder_k.") for k in model) else ""
        decoder, cfg = _decon_decoder(_strip(model, prefix + "decoder_k."), obj.get("args"), path)
        meta.update(method="decon-layout (teacher)" if decoder else "slotcon-layout (teacher)", decoder=decoder,
                    decoder_cfg=cfg)
        return _found(_strip(model, prefix + "encoder_k."), meta, path)
    state = obj.get("state_dict", obj)
    if any(k.startswith("module.encoder_q.") for k in state):  # MoCo: the query encoder, without its fc head
        backbone = {k: v for k, v in _strip(state, "module.encoder_q.").items() if not k.startswith("fc.")}
        return _found(backbone, dict(meta, method="moco-layout (query encoder)"), path)
    if any(k.startswith("encoder_q.1.lateral_convs.") for k in state):  # MCL (OpenSelfSup): the online network
        fpn = _mmcv_fpn(state, "encoder_q.1.")
        meta.update(method="mcl-layout (online network)", decoder=fpn, region_head_convs=_mmcv_region_head(state, "encoder_q.2."),
                    decoder_cfg={"type": "fpn", "levels": sorted({k.split(".")[1] for k in fpn if k.startswith("output.")})})
        return _found(_strip(state, "backbone."), meta, path)
    if any(k.startswith("backbone.") for k in state):  # OpenSelfSup (DenseCL): model.backbone, the query encoder
        return _found(_strip(state, "backbone."), dict(meta, method="openselfsup-layout (backbone)"), path)
    plain = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    return _found({k: v for k, v in plain.items() if not k.startswith(("fc.", "head."))},
                  dict(meta, method="state-dict"), path)


def _found(backbone, meta, path):
    """Record the architecture the tensors belong to; refuse a file with no backbone in it."""
    if not backbone:
        raise SystemExit(f"--init {path}: no backbone tensors found ({meta['method']}); see the layouts in weights.py")
    meta.setdefault("arch", infer_arch(backbone))
    return backbone, meta


def load_backbone(backbone, state, arch, meta, init):
    """Load a backbone state dict, every tensor of it: names and shapes are compared first, so a
    mismatch says what the file holds instead of a page of size mismatches."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if wrong and "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
        raise SystemExit(f"--init {init} is a ViT with {state['patch_embed.proj.weight'].shape[-1]}-pixel patches, the "
                         f"model {own['patch_embed.proj.weight'].shape[-1]}: pass --patch-size "
                         f"{state['patch_embed.proj.weight'].shape[-1]}")
    if missing or unexpected or wrong:
        stored = meta.get("arch") or "not recorded"
        raise SystemExit(f"--init {init} does not fit a {arch} (the file's architecture: {stored}; layout "
                         f"{meta.get('method')}): {len(missing)} missing tensors {missing[:3]}, {len(unexpected)} "
                         f"unexpected {unexpected[:3]}, {len(wrong)} of other shape {wrong[:3]}. Pass the right --arch"
                         + (f" ({stored})" if stored != "not recorded" else "") + ".")
    backbone.load_state_dict(state, strict=True)


def to_detectron2(backbone, decoder=None, region_head_convs=None):
    """Rename a torchvision ResNet (and a DeCon/MCL FPN, and MCL's region-head convs) state dict to
    detectron2's names, as numpy arrays."""
    out = {}
    for k, v in backbone.items():
        if "num_batches_tracked" in k:
            continue
        name = k
        if name.startswith("conv1.") or name.startswith("bn1."):
            name = "stem." + name.replace("bn1.", "conv1.norm.")
        else:
            name = name.replace("layer1.", "res2.").replace("layer2.", "res3.").replace("layer3.", "res4.").replace("layer4.", "res5.")
            for i in (1, 2, 3):
                name = name.replace(f".bn{i}.", f".conv{i}.norm.")
            name = name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[name] = v.numpy()
    for k, v in (decoder or {}).items():
        if "num_batches_tracked" in k:
            continue
        kind, level, layer, param = k.split(".")  # lateral.0.1.weight (C2) or output.p2.1.weight
        level = int(level) + 2 if kind == "lateral" else int(level[1:])
        name = f"fpn_{kind}{level}" + (".norm" if layer == "1" else "") + f".{param}"
        out[name] = v.numpy()
    for k, v in (region_head_convs or {}).items():
        # MCL's converter: the region head's 4 conv-BN pairs -> the 4conv1fc box head's conv1-4
        # (convs at Sequential index 0, 3, 6, 9; their BNs right after).
        if "num_batches_tracked" in k:
            continue
        index, param = k.split(".")
        conv, is_norm = divmod(int(index), 3)
        out[f"roi_heads.box_head.conv{conv + 1}" + (".norm" if is_norm else "") + f".{param}"] = v.numpy()
    return out


TIMM_NAMES = {("vit_tiny", 16): "vit_tiny_patch16_224", ("vit_small", 16): "vit_small_patch16_224",
              ("vit_small", 8): "vit_small_patch8_224", ("vit_base", 16): "vit_base_patch16_224",
              ("vit_base", 8): "vit_base_patch8_224"}  # (arch, patch) -> timm's model; vit_micro has none


def vit_geometry(state, meta, patch_size=None):
    """(patch size, image size) of a ViT state dict: --patch-size, else the file's metadata, else
    read off the tensors (the patch embedding's kernel; the positional table's side x the patch).
    A state that is no ViT gets the defaults, and load_backbone then names what the file holds."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        return patch_size or meta.get("patch_size") or 16, meta.get("img_size") or 224
    patch = patch_size or meta.get("patch_size") or state["patch_embed.proj.weight"].shape[-1]
    side = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    return patch, meta.get("img_size") or side * patch


def export(args):
    """--export detectron2 OUT.pkl | torchvision OUT.pth | timm OUT.pth: only weights of which every
    backbone tensor was found in --init (the backbone is rebuilt and loaded strictly first)."""
    fmt, path = args.export
    backbone, meta = load_init(args.init)
    if backbone is None:
        raise SystemExit("--export needs --init pointing at pre-trained weights")
    arch = args.arch or meta.get("arch") or "resnet50"
    vit = arch.startswith("vit")
    if vit:
        patch, img_size = vit_geometry(backbone, meta, getattr(args, "patch_size", None))
        net = common.ViT(arch, patch, img_size)
    else:
        net = common.ResNetTrunk(arch)
    load_backbone(net, backbone, arch, meta, args.init)  # all or nothing
    try:  # --export FORMAT new/folder/out.pth: the folder is made
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--export {fmt} {path}: cannot make its folder ({type(e).__name__}: {e})") from None
    hint = ""
    if fmt == "timm":
        if not vit:
            raise SystemExit(f"--export timm is for ViTs; {arch} is a ResNet (use torchvision or detectron2)")
        if (arch, patch) not in TIMM_NAMES:
            raise SystemExit(f"--export timm: {arch} with patch {patch} has no timm model; timm has "
                             f"{', '.join(f'{a}/{p}' for a, p in TIMM_NAMES)}")
        torch.save(net.state_dict(), path)  # the names are timm's: timm.create_model(name, num_classes=0) loads it strictly
        size = f", img_size={img_size}" if img_size != 224 else ""  # timm's positional table must be this run's
        hint = f"; load it with timm.create_model('{TIMM_NAMES[arch, patch]}', num_classes=0{size})"
    elif vit:
        raise SystemExit(f"--export {fmt}: {arch} is a ViT; use --export timm")
    elif fmt == "detectron2":
        decoder = meta.get("decoder") if (meta.get("decoder_cfg") or {}).get("type") == "fpn" else None
        model = to_detectron2(net.state_dict(), decoder, meta.get("region_head_convs"))
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": f"dense-ssl/{meta.get('method')}", "matching_heuristics": True}, f)
    elif fmt == "torchvision":
        import torchvision
        tv = getattr(torchvision.models, arch)(weights=None)  # fc stays freshly initialised: pre-training has none
        missing, unexpected = tv.load_state_dict(net.state_dict(), strict=False)
        assert missing == ["fc.weight", "fc.bias"] and not unexpected, (missing, unexpected)
        torch.save(tv.state_dict(), path)
    else:
        raise SystemExit(f"--export {fmt}: expected detectron2, torchvision or timm")
    print(f"wrote {path} ({fmt}, {arch}) from {args.init} ({meta.get('method')}){hint}")
