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
    install_mmcv(notes)
    root = path / "openselfsup"
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

