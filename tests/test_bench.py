"""bench.py: the miniature's command lines, and the speed figures' arithmetic."""
import importlib
import json

import bench
from conftest import python


def test_quality_commands_parse_and_share_one_budget(tmp_path):
    # A flag renamed in a method file must fail here, not 25 minutes into `bench.py quality`.
    for seed in (0, 1):
        budgets = set()
        for name, cmd in bench.quality_commands(seed, str(tmp_path)):
            script, *argv = cmd.split()
            args = importlib.import_module(script.removesuffix(".py")).get_args(argv)
            assert args.seed == seed and str(args.output_dir).startswith(str(tmp_path / f"s{seed}"))
            if script != "eval_dense.py":  # every pre-training run gets the same budget
                size = args.global_size if script == "adclr.py" else args.image_size
                budgets.add((size, args.batch_size, args.epochs, args.synthetic_len))
            elif name.startswith("probe"):
                assert (args.task, args.iters, args.crop_size, args.output_stride) == ("probe", 300, 64, 8)
        assert budgets == {(64, 32, 3, 1024)}


def test_speed_reports_the_ratio_of_medians(tmp_path):
    out = python("bench.py", "speed", "--one", "--methods", "moco", "--arch", "resnet18", "--image-size", "32",
                 "--batch-size", "4", "--steps", "2", "--warmup", "1")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["method"] == "moco" and r["device"].startswith("CPU") and r["step_s"] > 0 and r["floor_s"] > 0
    assert abs(r["ratio"] - r["step_s"] / r["floor_s"]) < 1e-9
    assert abs(r["images_per_s"] - 4 / r["step_s"]) < 1e-9
    assert r["peak_gib"] > 0
