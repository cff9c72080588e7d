"""adclr.py: attention mask properties, DINO and query losses against naive references, runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import adclr
import common
from conftest import assert_ranks_equal, python, rank_dump_script, torchrun
from torchvision.transforms import v2

TINY_ADCLR = ["--arch", "vit_micro", "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--num-queries",
              "4", "--out-dim", "128", "--synthetic-len", "32", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def _vit_and_queries(seed=0):
    torch.manual_seed(seed)
    vit = common.ViT("vit_micro", 16, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    queries = torch.randn(2, 5, 96)  # (B, Q, D) query tokens
    return vit, x, queries, adclr.query_mask(1 + 16, 5, 1, False, x.device)


def test_mask_leaves_the_image_tokens_untouched():
    vit, x, q, mask = _vit_and_queries()
    plain = vit(x)  # (B, 17, D)
    with_q = adclr.with_queries(vit, x, q, mask)
    assert torch.allclose(with_q[:, :17], plain, atol=1e-5)
    without_mask = adclr.with_queries(vit, x, q, None)  # bidirectional attention: the queries leak into the image tokens
    assert not torch.allclose(without_mask[:, :17], plain, atol=1e-3)


def test_a_query_does_not_see_the_other_queries_unless_allowed():
    vit, x, q, mask = _vit_and_queries()
    q2 = q.clone()
    q2[:, 3] = torch.randn_like(q2[:, 3])  # change query 3 only (a constant shift would vanish in LayerNorm)
    a, b = adclr.with_queries(vit, x, q, mask), adclr.with_queries(vit, x, q2, mask)
    assert torch.allclose(a[:, 17 + 0], b[:, 17 + 0], atol=1e-5)  # query 0 is unaffected
    assert not torch.allclose(a[:, 17 + 3], b[:, 17 + 3], atol=1e-3)
    open_mask = adclr.query_mask(17, 5, 1, True, x.device)
    c, d = adclr.with_queries(vit, x, q, open_mask), adclr.with_queries(vit, x, q2, open_mask)
    assert not torch.allclose(c[:, 17 + 0], d[:, 17 + 0], atol=1e-4)
    assert torch.allclose(c[:, :17], a[:, :17], atol=1e-5)  # image tokens still blind to queries


def test_dino_loss_equals_naive_pairs():
    torch.manual_seed(0)
    V, B, K = 4, 3, 7
    s, t, center = torch.randn(V, B, K), torch.randn(2, B, K), torch.randn(K) * 0.1
    total, n = 0.0, 0
    for iq in range(2):
        for v in range(V):
            if v == iq:
                continue
            for b in range(B):
                tp = [math.exp((t[iq, b, k] - center[k]) / 0.04) for k in range(K)]
                sp = [math.exp(s[v, b, k] / 0.1) for k in range(K)]
                total += -sum(tp[k] / sum(tp) * math.log(sp[k] / sum(sp)) for k in range(K)) / B
            n += 1
    assert adclr.dino_loss(s, t, center, 0.1, 0.04).item() == pytest.approx(total / n, rel=1e-5)


def test_query_loss_matches_the_same_query_across_views():
    torch.manual_seed(0)
    B, Q, K = 2, 3, 5
    s, t, center = torch.randn(2, B, Q, K), torch.randn(2, B, Q, K), torch.randn(K) * 0.1
    losses = []
    for a, b_ in ((0, 1), (1, 0)):  # student view a against teacher view b_
        for b in range(B):
            for i in range(Q):
                target = F.softmax((t[b_, b, i] - center) / 0.07, 0)
                losses.append(-(target * F.log_softmax(s[a, b, i] / 0.1, 0)).sum())
    assert adclr.query_loss(s, t, center, 0.1, 0.07).item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_center_update():
    center = torch.ones(4)
    out = torch.tensor([[0.0, 2.0, 4.0, 6.0], [2.0, 2.0, 2.0, 2.0]])
    adclr.update_center(center, out, 0.9)
    assert torch.allclose(center, 0.9 + 0.1 * torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_vit_parameter_names_follow_timm():
    names = set(common.ViT("vit_micro").state_dict())
    for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.bias", "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "norm.weight"):
        assert n in names, n


def test_adclr_runs_and_exports_a_probeable_vit(tmp_path):  # resuming: tests/test_reliability.py
    out = tmp_path / "run"
    python("adclr.py", *TINY_ADCLR, "--max-steps", "3", "--output-dir", out)
    assert common.load_checkpoint(out / "checkpoint.pth")["step"] == 3
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert all(math.isfinite(rec[k]) and rec[k] > 0 for k in ("loss", "loss_dino", "loss_query"))
    down = common.load_checkpoint(out / "downstream.pth")
    assert down["method"] == "adclr" and down["arch"] == "vit_micro" and "blocks.0.attn.qkv.weight" in down["backbone"]
    python("eval_dense.py", "--init", out, "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train", "16",
           "--synthetic-val", "4", "--iters", "2", "--batch-size", "4", "--workers", "0", "--output-dir", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["arch"] == "vit_micro" and 0 <= m["mIoU"] <= 100


def test_query_weight_zero_is_plain_dino(tmp_path):
    python("adclr.py", *TINY_ADCLR, "--max-steps", "1", "--query-weight", "0", "--output-dir", tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert rec["loss_query"] == 0 and rec["loss"] == rec["loss_dino"]
    assert common.load_checkpoint(tmp_path / "run" / "downstream.pth")["method"] == "dino"


def test_torchrun_two_processes(tmp_path):
    script = rank_dump_script(tmp_path, "adclr")
    torchrun(2, script, *TINY_ADCLR, "--max-steps", "2", "--output-dir", tmp_path / "run")
    assert_ranks_equal(tmp_path, 50)  # LayerNorm only: nothing is per-rank


def _tiny_step(extra=()):
    """One train_step of a vit_micro ADCLR on random views; returns (student before, student after, args)."""
    torch.manual_seed(0)
    args = adclr.get_args(["--arch", "vit_micro", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
                           "--num-queries", "3", "--out-dim", "64", "--batch-size", "4", "--freeze-last-layer", "0",
                           *extra])
    student = adclr.DINONet(args, drop_path=args.drop_path)
    teacher = __import__("copy").deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = ([torch.randn(4, 3, 32, 32) for _ in range(2)], [torch.randn(4, 3, 16, 16) for _ in range(2)],
             torch.randn(4, 3, 3, args.query_size, args.query_size))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    s = adclr.State(student, teacher, torch.zeros(64), torch.zeros(64), opt, scaler, None, torch.device("cpu"))
    out = adclr.train_step(batch, s, 1, 0.9, 0.04, args)
    return before, student, args, out


def test_clip_grad_zero_means_no_clipping():
    before, student, _, _ = _tiny_step(["--clip-grad", "0"])
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "vit.blocks.0.attn.qkv.weight" in moved and "head.mlp.0.weight" in moved


def test_norm_last_layer_false_learns_the_norm_and_names_follow_dino():
    before, student, _, _ = _tiny_step([])  # default: false, the authors' 100-epoch launch
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v"} <= set(before)
    assert not torch.equal(student.state_dict()["head.last_layer.weight_g"], before["head.last_layer.weight_g"])
    before, student, _, _ = _tiny_step(["--norm-last-layer", "true"])  # g fixed at 1, as DINO's default
    assert torch.equal(student.state_dict()["head.last_layer.weight_g"], torch.ones(64, 1))


def test_stochastic_depth_in_the_student_only():
    args = adclr.get_args(["--arch", "vit_micro", "--global-size", "32"])
    student = adclr.DINONet(args, drop_path=args.drop_path)
    assert [b.drop_path for b in student.vit.blocks] == pytest.approx([0, 0.1 / 3, 0.2 / 3, 0.1])  # DINO's linear rates
    x = torch.randn(8, 3, 32, 32)
    student.train()
    torch.manual_seed(0)
    a = student.vit(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, student.vit(x))
    student.eval()
    assert torch.allclose(student.vit(x), student.vit(x))


def test_positional_embedding_interpolation_is_dinos():
    torch.manual_seed(0)
    vit = common.ViT("vit_micro", 16, 224)  # 14 x 14 table
    for h, w in ((6, 6), (4, 7)):
        grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic")  # DINO's formula
        ref = torch.cat([vit.pos_embed[:, :1], ref.flatten(2).transpose(1, 2)], 1)
        assert torch.equal(vit.pos_for(h, w), ref)
    assert torch.equal(vit.pos_for(14, 14), vit.pos_embed)


def test_dino_crops_are_bicubic_and_blur_covers_three_sigma():
    args = adclr.get_args(["--arch", "vit_micro", "--global-size", "64", "--local-size", "32"])
    t = adclr.MultiCropWithQueries(args)
    crops = [m for m in t.global1.transforms + t.local.transforms if isinstance(m, v2.RandomResizedCrop)]
    assert len(crops) == 2 and all(c.interpolation == v2.InterpolationMode.BICUBIC for c in crops)
    assert common.blur_kernel(64) >= 13 and common.blur_kernel(224) == 23


def test_query_options_of_the_authors_code():
    """Multi-token query crops (4 tokens each), targets from the crops encoded alone, queries that
    see each other: the shapes, the mask and a finite step."""
    mask = adclr.query_mask(5, 2, 4, False, torch.device("cpu"))
    assert mask[5, 5:9].all() and not mask[5, 9:].any() and not mask[:5, 5:].any()
    assert adclr.query_mask(5, 2, 4, True, torch.device("cpu"))[5, 5:].all()
    _, _, args, out = _tiny_step(["--query-size", "32", "--query-target", "alone", "--queries-see-each-other",
                                  "--query-augment", "local"])
    assert args.query_tokens == 4 and torch.isfinite(out).all() and out[2] > 0
    net = adclr.DINONet(args)
    assert net.encode_queries_alone(torch.randn(2, 3, 3, 32, 32)).shape == (2, 12, 64)
    _, q_out = net([torch.randn(2, 3, 32, 32)] * 2, (), torch.randn(2, 3, 3, 32, 32))
    assert q_out.shape == (2, 2, 12, 64)


def test_defaults_are_one_recipe_the_authors_launch_then_dino():
    # The authors' 100-epoch ViT-S/16 launch (Sherrylone/PQCL README) where it sets a value, DINO's
    # main_dino.py defaults elsewhere (#40): no mix of DINO's 100-, 300- and 800-epoch runs.
    a = adclr.get_args([])
    launch = dict(epochs=100, batch_size=512, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                  query_scale=(0.05, 0.25), teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer="false",
                  query_weight=1.0, drop_path=0.1, local_size=96)
    dino = dict(out_dim=65536, local_crops=8, lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04,
                weight_decay_end=0.4, momentum_teacher=0.996, warmup_teacher_temp=0.04, student_temp=0.1,
                center_momentum=0.9, clip_grad=3.0, freeze_last_layer=1, global_size=224, patch_size=16)
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items() if k in launch | dino} == launch | dino
