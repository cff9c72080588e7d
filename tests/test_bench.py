"""bench.py: the miniature's command lines, and the speed figures' arithmetic."""
import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import quality as bench_quality
import common
from conftest import python


def test_quality_commands_parse_and_share_one_budget(tmp_path):
    # A flag renamed in a method file must fail here, not an hour into `bench.py quality`.
    for tier in ("cpu", "gpu"):
        budgets = set()
        for method, (script, *_) in bench_quality.PRETRAIN.items():
            cmd = bench_quality.pretrain_command(method, 1, tier, tmp_path / method)
            args = importlib.import_module(cmd[0].removesuffix(".py")).get_args(cmd[1:])
            size = args.global_size if script == "adclr.py" else args.image_size
            assert args.seed == 1 and Path(args.output_dir) == tmp_path / method
            budgets.add((size, args.batch_size, args.epochs * args.synthetic_len))  # images seen, not steps
        assert budgets == {(bench_quality.TIERS[tier]["size"], bench_quality.TIERS[tier]["batch"],
                            bench_quality.TIERS[tier]["images"])}
        for arch in ("resnet18", "vit_micro"):
            ceiling = importlib.import_module("eval_dense").get_args(bench_quality.ceiling_command(arch, 1, tier, tmp_path)[1:])
            x = {"resnet18": 1, "vit_micro": 4}[arch]  # the ViT's ceiling gets 4x the images (bench_quality.CEILING_X)
            assert ceiling.iters * ceiling.batch_size == x * bench_quality.TIERS[tier]["images"]


def test_mono_tiers_reach_every_dataset_the_runs_build(tmp_path):
    """--tier cpu-mono: the pre-training, the ceiling, the probe and the detection all read the mono
    scenes (grey: R = G = B); --tier cpu the colour ones."""
    import eval_dense
    from evaluation import seg_data
    grey = lambda img: np.abs(np.asarray(img, np.float32)[..., 0] - np.asarray(img, np.float32)[..., 1]).max() < 2  # R = G
    for tier, style in (("cpu", "colour"), ("cpu-mono", "mono"), ("gpu-mono", "mono")):
        for method in bench_quality.PRETRAIN:
            cmd = bench_quality.pretrain_command(method, 1, tier, tmp_path / method)
            args = importlib.import_module(cmd[0].removesuffix(".py")).get_args(cmd[1:])
            assert args.synthetic_style == style
        crop = getattr(args, "global_size", None)  # the last method, adclr, names its crop as adclr.build_data does
        assert grey(common.build_pretrain_dataset(args, None, crop=crop)[0]) == (style == "mono")
        evals = [bench_quality.ceiling_command("resnet18", 1, tier, tmp_path)[1:],
                 bench_quality.probe_args("random", "resnet18", 1, tier, tmp_path),
                 bench_quality.detection_args("random", "resnet18", 1, tier, tmp_path)]
        for argv in evals:
            assert eval_dense.get_args(argv).synthetic_style == style
        args = eval_dense.get_args(evals[1] + ["--workers", "0"])
        train, val, *_ = seg_data.build_data(args, torch.device("cpu"))
        pixels = lambda x, y: ((x.permute(1, 2, 0) * torch.tensor(common.IMAGENET_STD)  # the scene's, not the padding's
                                + torch.tensor(common.IMAGENET_MEAN)) * 255)[y != seg_data.IGNORE]
        assert grey(pixels(*train.dataset[(0, 0)])) == grey(pixels(*val.dataset[0])) == (style == "mono")


@pytest.mark.slow
def test_quality_pipeline_at_toy_size_reports_what_the_runs_measured(tmp_path):
    """The whole pipeline (floor, ceiling, one method with its learning curve, the probes, the table)
    at a toy size; every number of quality.json and of the table is a probe's metrics.json."""
    python("benchmarks/bench.py", "quality", "--tier", "toy", "--seeds", "0", "--methods", "moco", "--detection", "--out", tmp_path)
    root = tmp_path / "toy"
    report = json.loads((root / "quality.json").read_text())
    measured = lambda d: json.loads((root / "s0" / d / "metrics.json").read_text())["mIoU"]
    rows = report["rows"]
    assert rows["random"]["final"] == [measured("probe-random")]
    assert rows["supervised"]["final"] == [measured("probe-supervised")]
    assert rows["moco"]["final"] == [measured("probe-moco-100")]
    assert rows["moco"]["curve"] == {str(f): measured(f"probe-moco-{int(f * 100)}") for f in bench_quality.FRACTIONS}
    table = (root / "quality.md").read_text()
    assert f"{measured('probe-moco-100'):.2f}" in table and f"{measured('probe-supervised'):.2f}" in table
    down = [common.load_checkpoint(root / "s0" / "moco" / f"downstream-{p}.pth") for p in (0, 100)]
    assert not torch.equal(down[0]["backbone"]["conv1.weight"], down[1]["backbone"]["conv1.weight"])
    assert (root / "quality.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    for name in ("random", "moco", "supervised"):  # the k-NN column: each row's k-NN run
        top1 = json.loads((root / "s0" / f"knn-{name}" / "metrics.json").read_text())["top1"]
        assert rows[name]["knn"]["per_seed"] == [top1] and f"{top1:.2f} ± 0.00" in table
    assert "| k-NN top-1 |" in table
    if importlib.util.find_spec("pycocotools"):  # --detection: the AP columns are the detection runs' metrics
        for name in ("random", "moco", "supervised"):
            det = json.loads((root / "s0" / f"detect-{name}" / "metrics.json").read_text())
            assert rows[name]["box_AP"]["per_seed"] == [det["box_AP"]] and rows[name]["mask_AP"]["per_seed"] == [det["mask_AP"]]
        assert "| box AP | mask AP |" in table


def test_quality_table_merges_every_finished_seed_from_disk(tmp_path):
    """A later command that adds seeds for some rows only: each row reports its own seeds, and z is
    computed only where both the row and its floor have more than one seed; the gain over a
    method's own start is paired per seed."""
    def finished(seed, name, miou):
        (tmp_path / f"s{seed}" / name).mkdir(parents=True)
        (tmp_path / f"s{seed}" / name / "metrics.json").write_text(json.dumps({"mIoU": miou}))
    for seed, (floor, sup, moco, dense) in {0: (8, 40, 10, 9), 1: (9, 41, 12, None), 2: (7, 42, 11, None)}.items():
        finished(seed, "probe-random", floor)
        finished(seed, "probe-supervised", sup)
        for method, final in (("moco", moco), ("densecl", dense)):
            if final is None:
                continue
            for f in bench_quality.FRACTIONS:
                finished(seed, f"probe-{method}-{int(f * 100)}", final if f == 1.0 else 8.0)
            (tmp_path / f"s{seed}" / method).mkdir()
            for pct in (0, 100):
                common.save_downstream(tmp_path / f"s{seed}" / method / f"downstream-{pct}.pth", method, "resnet18",
                                       torch.nn.Conv2d(1, 1, 1))
    rows = bench_quality.summary(bench_quality.collect(tmp_path))
    assert rows["moco"]["seeds"] == [0, 1, 2] and rows["moco"]["final"] == [10, 12, 11] and rows["moco"]["mean"] == 11
    assert rows["densecl"]["seeds"] == [0] and rows["densecl"]["std"] == 0.0
    table = bench_quality.markdown(rows, {}, "cpu")
    moco_line = next(l for l in table.splitlines() if l.startswith("| moco |"))
    densecl_line = next(l for l in table.splitlines() if l.startswith("| densecl |"))
    assert moco_line.split(" | ")[1:5] == ["3", "11.00 ± 1.00", "10.00 / 12.00 / 11.00", "+2.1"]  # (11-8)/sqrt(1+1)
    assert densecl_line.split(" | ")[1:5] == ["1", "9.00 ± 0.00", "9.00", "-"]
    # Against its own 0% snapshot (8.0 in every seed here), paired: gains 2, 4, 3, so z = 3 / 1.
    assert rows["moco"]["gain"] == {"per_seed": [2, 4, 3], "mean": 3.0, "std": 1.0}
    assert moco_line.split(" | ")[5] == "+3.00 ± 1.00 (+3.0)" and densecl_line.split(" | ")[5] == "+1.00 ± 0.00"


def test_speed_reports_the_ratio_of_medians(tmp_path):
    out = python("benchmarks/bench.py", "speed", "--one", "--methods", "moco", "--arch", "resnet18", "--image-size", "32",
                 "--batch-size", "4", "--steps", "2", "--warmup", "1")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["method"] == "moco" and r["device"].startswith("CPU") and r["step_s"] > 0 and r["floor_s"] > 0
    assert abs(r["ratio"] - r["step_s"] / r["floor_s"]) < 1e-9
    assert abs(r["images_per_s"] - 4 / r["step_s"]) < 1e-9
    assert r["peak_gib"] > 0


def test_gpu_command_runs_every_section_on_cpu_at_tiny_shapes(tmp_path):
    # `bench.py gpu` is run in short GPU windows: this keeps it from rotting between them. --tiny has
    # no time budget (--budget 0 is ignored), so every row runs however busy the machine is.
    (tmp_path / "tmp").mkdir()
    python("benchmarks/bench.py", "gpu", "--device", "cpu", "--tiny", "--budget", "0", "--out", tmp_path,
           env={"TMPDIR": str(tmp_path / "tmp")})
    assert list((tmp_path / "tmp").iterdir()) == []  # the loader section's JPEG files are removed
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert (tmp_path / "gpu_report.md").read_text().startswith("# GPU report: CPU")
    checked = {r["check"].split(":")[0] for r in report["correctness"] if r["ok"] is not None}
    assert {"moco", "densecl", "decon", "mcl", "adclr"} <= checked
    assert all(r["ok"] for r in report["correctness"] if r["ok"] is not None)
    eager = [r for r in report["speed"] if not r["compile"]]
    assert [r["method"] for r in eager] == ["moco", "densecl", "decon", "mcl", "adclr"]
    for r in eager:  # the ratios are the medians' ratios
        assert abs(r["over_networks"] - r["step_s"] / r["networks_floor_s"]) < 1e-9 and r["networks_floor_s"] > 0
    assert {r["verdict"] for r in report["loader"]} <= {"keeps up", "stalls"} and len(report["loader"]) == 10  # each method twice: with --gpu-augment


def test_gpu_correctness_check_catches_a_wrong_fused_loss(monkeypatch):
    from benchmarks import gpu as bench_gpu
    import densecl
    assert bench_gpu.check_queue_loss(torch.device("cpu"))["ok"]
    wrong = densecl.QueueInfoNCE.apply
    monkeypatch.setattr(densecl.QueueInfoNCE, "apply", lambda q, k, queue, t: wrong(q, k, queue, t * 1.001))
    assert not bench_gpu.check_queue_loss(torch.device("cpu"))["ok"]


def test_networks_floor_runs_every_trained_network():
    # the networks floor must reach each trained parameter: none left without a gradient
    import argparse
    from benchmarks import speed as bench
    from benchmarks import gpu as bench_gpu
    cfg = bench_gpu.configs(argparse.Namespace(tiny=True, workers=0))
    for method in ("moco", "densecl", "decon", "adclr"):
        *_, (train_fwd, _, params) = bench_gpu.setup(method, cfg, torch.device("cpu"), None)
        bench._mean_of(train_fwd()).backward()
        missing = [i for i, p in enumerate(params) if p.requires_grad and p.grad is None]
        assert not missing, (method, len(missing))


def test_memory_step_peak_counts_the_tensors_alive_together():
    from benchmarks import memory
    # ones (4 MB) and the product (4 MB) are alive together; the sum after them is 4 bytes
    peak = memory.step_peak(lambda: (torch.ones(1000, 1000) * 2).sum())
    assert 8e6 <= peak < 8.1e6
