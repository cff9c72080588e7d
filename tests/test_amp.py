"""CUDA's default path, run on the CPU: every method file trains a step under --amp bf16 (CPU
autocast makes the same casts as the CUDA default) with --gpu-augment (the device pipeline on the
CPU device). The losses and the matching (the functions under common.fp32) return fp32, and every
floating tensor the run keeps (weights, queues, centers, optimizer state) stays fp32."""
import importlib
import json
import math

import pytest
import torch

import common
from test_standalone import CASES

FP32_CODE = common.fp32(lambda: None).__code__  # the wrapper's code: how a common.fp32 function is recognised


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


@pytest.mark.parametrize("script", sorted(CASES))
def test_bf16_autocast_and_device_augment_keep_losses_and_state_fp32(tmp_path, monkeypatch, script):
    module = importlib.import_module(script[:-3])
    returned, autocast_dtypes = {}, set()
    for name, fn in list(vars(module).items()):
        if getattr(fn, "__code__", None) is FP32_CODE:
            def spy(*args, _name=name, _fn=fn, **kwargs):
                out = _fn(*args, **kwargs)
                returned.setdefault(_name, set()).update(t.dtype for t in _tensors(out) if t.is_floating_point())
                return out
            monkeypatch.setattr(module, name, spy)
    autocast = common.autocast

    def record(device, dtype):
        autocast_dtypes.add(dtype)
        return autocast(device, dtype)
    monkeypatch.setattr(common, "autocast", record)
    out = tmp_path / "run"
    module.main([*CASES[script], "--amp", "bf16", "--gpu-augment", "--max-steps", "1", "--output-dir", str(out)])
    assert autocast_dtypes == {torch.bfloat16}
    assert returned and all(d <= {torch.float32} for d in returned.values()), returned  # matching may return indices only
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    losses = [v for k, v in rec.items() if "loss" in k]
    assert losses and all(math.isfinite(x) for x in _flat(losses))
    ckpt = common.load_checkpoint(out / "checkpoint.pth")
    kept = {t.dtype for k, v in ckpt.items() if k != "rng" for t in _tensors(v) if t.is_floating_point()}
    assert kept == {torch.float32}


def _flat(values):
    for v in values:
        yield from (_flat(v) if isinstance(v, list) else [v])


@pytest.mark.parametrize("script", ["moco.py", "adclr.py"])  # a ResNet and a ViT
def test_compile_traces_the_student_and_trains_as_eager(tmp_path, monkeypatch, script):
    """--compile on the CPU through dynamo and AOT autograd (backend aot_eager): inductor's code
    generation alone took 166 s for one moco step on the 2-core CI machine, so it runs in the GPU tier
    (tests/test_cuda.py). The compiled run's first loss equals the eager run's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    module = importlib.import_module(script[:-3])
    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counter))
    loss = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flags else "eager")
        module.main([*CASES[script], *flags, "--max-steps", "1", "--output-dir", str(out)])
        loss[bool(flags)] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert counter.frame_count >= 1 and counter.op_count > 10  # the student went through dynamo
    assert loss[True] == pytest.approx(loss[False], rel=1e-4)
