"""The smallest stand-ins for the frameworks the official OpenSelfSup-based code imports (DenseCL,
MCL): mmcv 0.x's few names, and OpenSelfSup's packages without their __init__ files (which import
datasets, apis and hooks the models do not need). The model files themselves are the official ones.
"""
import importlib
import sys
import types

import torch.distributed as dist
import torch.nn as nn


def _kaiming_init(module, a=0, mode="fan_out", nonlinearity="relu", bias=0, distribution="normal"):
    """mmcv 0.x mmcv.cnn.kaiming_init."""
    init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
    init(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _normal_init(module, mean=0, std=1, bias=0):
    """mmcv 0.x mmcv.cnn.normal_init."""
    nn.init.normal_(module.weight, mean, std)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _constant_init(module, val, bias=0):
    """mmcv 0.x mmcv.cnn.constant_init."""
    nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _xavier_init(module, gain=1, bias=0, distribution="normal"):
    """mmcv 0.x/1.0 mmcv.cnn.xavier_init."""
    init = nn.init.xavier_uniform_ if distribution == "uniform" else nn.init.xavier_normal_
    init(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


class _ConvModule(nn.Module):
    """mmcv 1.0's mmcv.cnn.ConvModule for what MCL's necks use: conv (bias only without a norm),
    then the norm (BatchNorm, attribute "bn", built like mmcv's build_norm_layer), then ReLU unless
    act_cfg is None; kaiming init (fan_out, relu) of the conv and constant 1 / 0 of the norm."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias="auto",
                 conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU"), inplace=True):
        super().__init__()
        assert conv_cfg is None and (norm_cfg is None or norm_cfg["type"] == "BN"), "stand-in: plain conv and BN only"
        assert act_cfg is None or act_cfg["type"] == "ReLU", "stand-in: ReLU only"
        self.with_norm, self.with_activation = norm_cfg is not None, act_cfg is not None
        bias = not self.with_norm if bias == "auto" else bias
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        if self.with_norm:
            self.bn = nn.BatchNorm2d(out_channels, eps=norm_cfg.get("eps", 1e-5))
            for p in self.bn.parameters():
                p.requires_grad = norm_cfg.get("requires_grad", True)
        if self.with_activation:
            self.activate = nn.ReLU(inplace=act_cfg.get("inplace", inplace))
        _kaiming_init(self.conv, a=0, nonlinearity="relu")
        if self.with_norm:
            _constant_init(self.bn, 1, bias=0)

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return self.activate(x) if self.with_activation else x


def _unused(*args, **kwargs):
    raise RuntimeError("a stand-in the check does not expect to be called")


def _get_dist_info():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _package(name, folder=None):
    module = types.ModuleType(name)
    module.__path__ = [str(folder)] if folder is not None else []
    sys.modules[name] = module
    return module


def install_mmcv(notes):
    """mmcv, mmcv.cnn, mmcv.runner, mmcv.parallel with the names OpenSelfSup's model files use."""
    mmcv = _package("mmcv")
    mmcv.is_str = lambda x: isinstance(x, str)
    cnn = _package("mmcv.cnn")
    cnn.kaiming_init, cnn.normal_init, cnn.constant_init = _kaiming_init, _normal_init, _constant_init
    cnn.xavier_init, cnn.ConvModule = _xavier_init, _ConvModule
    runner = _package("mmcv.runner")
    runner.load_checkpoint, runner.get_dist_info = _unused, _get_dist_info
    parallel = _package("mmcv.parallel")
    parallel.MMDistributedDataParallel = nn.parallel.DistributedDataParallel
    mmcv.cnn, mmcv.runner, mmcv.parallel = cnn, runner, parallel
    notes.add("stand-ins for mmcv 0.x/1.0: mmcv.is_str, mmcv.cnn.{kaiming,normal,constant,xavier}_init and "
              "mmcv.cnn.ConvModule (conv-BN-ReLU; mmcv's definitions), "
              "mmcv.runner.get_dist_info, mmcv.runner.load_checkpoint (never called); MMDistributedDataParallel -> "
              "torch DDP with OpenSelfSup's broadcast_buffers=False")


def import_openselfsup(path, models, notes):
    """Import openselfsup.models.<m> for m in `models` from the checkout at `path` (its `openselfsup`
    folder), after the mmcv stand-ins; the package __init__ files of openselfsup, openselfsup.utils
    and openselfsup.models are skipped (they import the data and training code), the rest is the
    official code. Returns {m: module}."""
    root = path / "openselfsup"
    if not (root / "models").is_dir():
        raise SystemExit(f"{path}: no openselfsup/models folder; --official must be a checkout of the official "
                         f"OpenSelfSup-based repository")
    install_mmcv(notes)
    for name in list(sys.modules):  # a fresh import per check
        if name == "openselfsup" or name.startswith("openselfsup."):
            del sys.modules[name]
    _package("openselfsup", root)
    utils = _package("openselfsup.utils", root / "utils")
    registry = importlib.import_module("openselfsup.utils.registry")
    logger = importlib.import_module("openselfsup.utils.logger")
    utils.Registry, utils.build_from_cfg = registry.Registry, registry.build_from_cfg
    utils.get_root_logger, utils.print_log = logger.get_root_logger, logger.print_log
    _package("openselfsup.models", root / "models")
    for sub in ("registry", "builder", "utils", "backbones", "necks", "heads"):
        importlib.import_module(f"openselfsup.models.{sub}")
    notes.add("openselfsup imported without its package __init__ files (openselfsup, .utils, .models: they "
              "import datasets/apis/hooks); models/registry, builder, utils, backbones, necks, heads and the "
              "model file are the official ones")
    return {m: importlib.import_module(f"openselfsup.models.{m}") for m in models}



# -------------------------------------------------------------------------------------------------
# detectron2 (the DeCon authors' FPN decoder subclasses detectron2's FPN)
# -------------------------------------------------------------------------------------------------
class _ShapeSpec:
    """detectron2.layers.ShapeSpec: channels and stride of a feature map."""

    def __init__(self, channels=None, height=None, width=None, stride=None):
        self.channels, self.height, self.width, self.stride = channels, height, width, stride


class _Backbone(nn.Module):
    """detectron2.modeling.backbone.Backbone: output_shape() from the _out_feature_* fields."""

    def output_shape(self):
        return {name: _ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}


class _Conv2d(nn.Conv2d):
    """detectron2.layers.Conv2d: a conv with an optional norm and activation after it."""

    def __init__(self, *args, **kwargs):
        norm, activation = kwargs.pop("norm", None), kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm, self.activation = norm, activation

    def forward(self, x):
        x = nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


def _get_norm(norm, out_channels):
    """detectron2.layers.get_norm for "" / "BN" / "SyncBN"; SyncBN is BatchNorm2d here (torch's
    SyncBatchNorm needs CUDA under a process group)."""
    if norm == "":
        return None
    return {"BN": nn.BatchNorm2d, "SyncBN": nn.BatchNorm2d}[norm](out_channels)


def _c2_xavier_fill(module):
    """detectron2 fvcore.nn.weight_init.c2_xavier_fill."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class _LastLevelMaxPool(nn.Module):
    """detectron2's LastLevelMaxPool (P6 from P5)."""

    def __init__(self):
        super().__init__()
        self.num_levels, self.in_feature = 1, "p5"

    def forward(self, x):
        return [nn.functional.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class _FPN(_Backbone):
    """detectron2.modeling.backbone.fpn.FPN.__init__ (the DeCon decoder overrides forward): per input
    feature a lateral 1x1 and an output 3x3 detectron2 Conv2d with the norm (bias only without one),
    c2_xavier_fill, registered as fpn_lateral<stage> / fpn_output<stage>, kept in top-down order."""

    def __init__(self, bottom_up, in_features, out_channels, norm="", top_block=None, fuse_type="sum", square_pad=0):
        super().__init__()
        import math
        shapes = bottom_up.output_shape()
        strides = [shapes[f].stride for f in in_features]
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(shapes[f].channels for f in in_features):
            lateral_conv = _Conv2d(in_channels, out_channels, kernel_size=1, bias=use_bias,
                                   norm=_get_norm(norm, out_channels))
            output_conv = _Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=use_bias,
                                  norm=_get_norm(norm, out_channels))
            _c2_xavier_fill(lateral_conv)
            _c2_xavier_fill(output_conv)
            stage = int(math.log2(strides[idx]))
            self.add_module(f"fpn_lateral{stage}", lateral_conv)
            self.add_module(f"fpn_output{stage}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        self.lateral_convs, self.output_convs = lateral_convs[::-1], output_convs[::-1]
        self.top_block, self.in_features, self.bottom_up = top_block, tuple(in_features), bottom_up
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if self.top_block is not None:
            for s in range(stage, stage + self.top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides.keys())
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility, self._square_pad = strides[-1], square_pad
        assert fuse_type in {"avg", "sum"}
        self._fuse_type = fuse_type


def install_detectron2(notes):
    """detectron2.modeling.backbone.fpn.{FPN, LastLevelMaxPool} and .backbone.Backbone."""
    for name in ("detectron2", "detectron2.modeling", "detectron2.modeling.backbone"):
        _package(name)
    fpn, backbone = _package("detectron2.modeling.backbone.fpn"), _package("detectron2.modeling.backbone.backbone")
    fpn.FPN, fpn.LastLevelMaxPool, backbone.Backbone = _FPN, _LastLevelMaxPool, _Backbone
    notes.add("stand-ins for detectron2: Backbone.output_shape, FPN.__init__ (detectron2's: Conv2d with norm, "
              "c2_xavier_fill, fpn_lateral<s>/fpn_output<s>), LastLevelMaxPool, get_norm with SyncBN -> BatchNorm2d")
