"""densecl.py: matching, dense loss against a naive reference, and whole runs."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import densecl
from conftest import TINY, assert_ranks_equal, python, rank_dump_script, torchrun


def test_matching_recovers_a_known_permutation():
    torch.manual_seed(0)
    q_feat = F.normalize(torch.randn(3, 32, 16), dim=1)  # (B, C, S²)
    perm = torch.stack([torch.randperm(16) for _ in range(3)])  # key location j shows query location perm[b, j]
    k_feat = torch.gather(q_feat, 2, perm.unsqueeze(1).expand(-1, 32, -1))
    match = densecl.match_locations(q_feat, k_feat)
    assert torch.equal(match, torch.argsort(perm, dim=1))  # query i matches the j with perm[j] = i


def test_dense_loss_equals_naive_per_image_per_location():
    torch.manual_seed(0)
    B, C, D, S2, K, T = 2, 16, 8, 9, 20, 0.2
    q_feat, k_feat = F.normalize(torch.randn(B, C, S2), dim=1), F.normalize(torch.randn(B, C, S2), dim=1)
    q_grid, k_grid = F.normalize(torch.randn(B, D, S2), dim=1), F.normalize(torch.randn(B, D, S2), dim=1)
    queue = F.normalize(torch.randn(D, K), dim=0)
    batched = densecl.dense_loss(q_grid, k_grid, densecl.match_locations(q_feat, k_feat), queue, T)
    losses = []
    for b in range(B):  # one image, one location at a time
        for i in range(S2):
            sims = [float(q_feat[b, :, i] @ k_feat[b, :, j]) for j in range(S2)]
            j = max(range(S2), key=lambda j: sims[j])
            pos = math.exp(float(q_grid[b, :, i] @ k_grid[b, :, j]) / T)
            neg = sum(math.exp(float(q_grid[b, :, i] @ queue[:, n]) / T) for n in range(K))
            losses.append(-math.log(pos / (pos + neg)))
    assert abs(batched.item() - sum(losses) / len(losses)) < 1e-5


def test_fused_queue_infonce_matches_plain_value_and_gradient():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(50, 16), dim=1).requires_grad_()
    k, queue = F.normalize(torch.randn(50, 16), dim=1), F.normalize(torch.randn(16, 300), dim=0)
    plain = densecl.infonce(q, k, queue, 0.2)
    (g_plain,) = torch.autograd.grad(plain, q)
    fused = densecl.QueueInfoNCE.apply(q, k, queue, 0.2, 64)  # 300 is no multiple of the chunk
    (g_fused,) = torch.autograd.grad(fused, q)
    assert torch.allclose(plain, fused, atol=1e-5) and torch.allclose(g_plain, g_fused, atol=1e-7)
    # a low temperature (large logits) stays finite: exp is shifted by each row's running maximum
    assert torch.isfinite(densecl.QueueInfoNCE.apply(q, k, queue, 0.01, 64))


@pytest.mark.parametrize("temperature", [0.005, 0.0115, 0.02, 0.2])
def test_fused_queue_infonce_is_exact_when_every_logit_is_near_minus_one_over_t(temperature):
    """Keys and positive nearly opposite every query: every logit near -1/T, where a fixed shift by
    +1/T underflows (T <= 0.0115 gave -inf). Both copies (densecl.py, decon_densecl.py) against the
    plain loss in float64, value and gradient."""
    import decon_densecl
    torch.manual_seed(0)
    v = F.normalize(torch.randn(16), dim=0)  # every query near v, every key near -v
    q = F.normalize(v + 0.05 * torch.randn(40, 16), dim=1)
    k = F.normalize(-v + 0.05 * torch.randn(40, 16), dim=1)
    queue = F.normalize(-v[:, None] + 0.05 * torch.randn(16, 300), dim=0)
    q64 = q.double().requires_grad_()
    plain = densecl.infonce.__wrapped__(q64, k.double(), queue.double(), temperature)  # float64, no fp32 cast
    (g_plain,) = torch.autograd.grad(plain, q64)
    for fn in (densecl.QueueInfoNCE, decon_densecl.QueueInfoNCE):
        q32 = q.clone().requires_grad_()
        fused = fn.apply(q32, k, queue, temperature, 64)
        (g_fused,) = torch.autograd.grad(fused, q32)
        # float32 rounding of logits up to 1/T = 200: the plain loss in float32 is off by as much (measured)
        assert torch.isfinite(fused) and abs(fused.item() - plain.item()) <= 1e-6 * (1 + abs(plain.item()))
        assert (g_fused.double() - g_plain).abs().max() <= 1e-5 * g_plain.abs().max()


def test_encoder_shapes_and_pooled_grid():
    enc = densecl.Encoder("resnet18", 16)
    feat, g, grid, pooled = enc(torch.randn(2, 3, 64, 64))
    assert feat.shape == (2, 512, 4) and g.shape == (2, 16) and grid.shape == (2, 16, 4)
    assert torch.allclose(pooled, grid.mean(2))


def test_coco_recipe_defaults():
    coco, imnet = densecl.get_args(["--data", "coco"]), densecl.get_args(["--data", "imagenet"])
    assert (coco.epochs, coco.lr) == (800, 0.3) and (imnet.epochs, imnet.lr) == (200, 0.03)
    assert densecl.get_args(["--data", "coco", "--lr", "0.1", "--epochs", "3"]).lr == 0.1


def test_densecl_runs_and_fills_both_queues(tmp_path):  # resuming: tests/test_reliability.py
    out = tmp_path / "run"
    python("densecl.py", *TINY, "--bn-splits", "2", "--queue-size", "64", "--epochs", "2", "--max-steps", "5", "--output-dir", out)
    ck = common.load_checkpoint(out / "checkpoint.pth")
    assert ck["step"] == 5 and ck["queue"]["ptr"].item() == 40 and ck["queue2"]["ptr"].item() == 40
    for name in ("queue", "queue2"):  # 40 real keys, unit norm, the rest still random
        assert torch.allclose(ck[name]["keys"][:, :40].norm(dim=0), torch.ones(40), atol=1e-5)
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = __import__("json").loads(line)
        assert all(0 < rec[k] < 20 for k in ("loss", "loss_global", "loss_dense"))
        assert abs(rec["loss"] - 0.5 * (rec["loss_global"] + rec["loss_dense"])) < 1e-4
    assert common.load_checkpoint(out / "downstream.pth")["method"] == "densecl"


def test_dense_warmup_sets_lambda_to_zero(tmp_path):
    python("densecl.py", *TINY, "--bn-splits", "2", "--queue-size", "64", "--max-steps", "2", "--dense-warmup-iters", "1",
           "--output-dir", tmp_path / "run")
    first = __import__("json").loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - first["loss_global"]) < 1e-5 and abs(first["loss_dense"] - first["loss"]) > 1e-3


def test_torchrun_two_processes(tmp_path):
    script = rank_dump_script(tmp_path, "densecl")
    torchrun(2, script, *TINY, "--queue-size", "64", "--max-steps", "2", "--output-dir", tmp_path / "run")
    r0 = assert_ranks_equal(tmp_path, 100)
    assert r0[3]["ptr"].item() == 16  # 2 ranks x 4 images x 2 steps in the dense queue


def test_fused_queue_infonce_refuses_keys_that_require_grad():
    # QueueInfoNCE's gradient is d/dq only: keys or a queue that require grad would silently get none.
    q, k, queue = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(8, 32)
    with pytest.raises(ValueError, match="gradient for q only"):
        densecl.QueueInfoNCE.apply(q, k, queue, 0.2)
    densecl.QueueInfoNCE.apply(q, k.detach(), queue, 0.2).backward()
    assert q.grad is not None
