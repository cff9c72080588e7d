"""decon.py: SlotCon losses against naive references, overlap alignment, EMA, heads, whole runs."""
import datetime
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import decon
import eval_dense
from conftest import TINY, assert_ranks_equal, python, rank_dump_script, torchrun

TINY_DECON = [*TINY, "--dim-hidden", "64"]


def test_crop_with_box_reports_the_crop_it_made():
    w, h = 200, 100
    ramp = np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3))  # pixel value = x coordinate
    img = Image.fromarray(ramp)
    for flip_p in (0.0, 1.0):
        torch.manual_seed(0)
        crop, box, flip = decon.crop_with_box(img, 50, scale=(0.2, 0.5), flip_p=flip_p)
        x = np.asarray(crop)[25, :, 0].astype(float)
        assert flip == bool(flip_p) and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        left, right = (x[-1], x[0]) if flip else (x[0], x[-1])
        assert abs(left - box[0].item() * w) < 3 and abs(right - box[2].item() * w) < 3


def test_group_loss_equals_naive_per_pixel():
    torch.manual_seed(0)
    B, K, h, w = 2, 5, 3, 3
    s, t, center = torch.randn(B, K, h, w), torch.randn(B, K, h, w), torch.randn(1, K) * 0.1
    losses = []
    for b in range(B):
        for i in range(h):
            for j in range(w):
                target = [math.exp((t[b, k, i, j] - center[0, k]) / 0.07) for k in range(K)]
                pred = [math.exp(s[b, k, i, j] / 0.1) for k in range(K)]
                losses.append(-sum(target[k] / sum(target) * math.log(pred[k] / sum(pred)) for k in range(K)))
    assert decon.group_loss(s, t, center, 0.1, 0.07).item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_slot_pooling_and_slot_loss_equal_naive_per_image():
    torch.manual_seed(0)
    B, K, D, h, w, tau = 3, 6, 4, 4, 4, 0.2
    zq, zk = torch.randn(B, D, h, w), torch.randn(B, D, h, w)
    sq, sk = torch.randn(B, K, h, w), torch.randn(B, K, h, w)
    sq[:, 5], sk[:, 4] = -9, -9  # prototype 5 never wins in the query view, 4 never in the key view
    q_slots, k_slots = decon.slots(zq, sq, 0.07), decon.slots(zk, sk, 0.07)
    b, k = 1, 2  # slot pooling for one (image, prototype) by hand
    a = torch.softmax(sq[b] / 0.07, dim=0)[k] + 1e-6
    assert torch.allclose(q_slots[b, k], (zq[b] * a).sum((1, 2)) / a.sum(), atol=1e-5)
    predictor = torch.nn.Linear(D, D)
    batched = decon.slot_loss(q_slots, k_slots, sq, sk, predictor, tau)
    # naive: every (image, prototype) valid in both views, against every valid teacher slot
    valid = lambda s, b, k: bool((s[b].argmax(0) == k).any())
    keys = [(b, k) for b in range(B) for k in range(K) if valid(sk, b, k)]
    key_vecs = torch.stack([F.normalize(k_slots[b, k], dim=0) for b, k in keys])
    losses = []
    for b in range(B):
        for k in range(K):
            if valid(sq, b, k) and valid(sk, b, k):
                q = F.normalize(predictor(q_slots[b, k]), dim=0)
                logits = key_vecs @ q / tau
                losses.append(torch.logsumexp(logits, 0) - logits[keys.index((b, k))])
    assert len(losses) > 3 and all(k_ != 4 for _, k_ in keys)
    assert batched.item() == pytest.approx((torch.stack(losses).mean() * 2 * tau).item(), rel=1e-5)


@pytest.mark.parametrize("flip1,flip2", [(False, False), (True, False), (False, True), (True, True)])
def test_alignment_maps_the_same_image_point_in_both_views(flip1, flip2):
    """Crop a coordinate image (R = x, G = y) twice, align both views to their overlap: every
    aligned pixel must show the same image point in both views."""
    W, H, size = 200, 160, 40
    xs, ys = np.meshgrid(np.linspace(0, 255, W), np.linspace(0, 255, H))
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], 2).astype(np.uint8))
    torch.manual_seed(3)
    v1, b1, f1 = decon.crop_with_box(img, size, (0.3, 0.5), flip_p=float(flip1))
    v2, b2, f2 = decon.crop_with_box(img, size, (0.3, 0.5), flip_p=float(flip2))
    if b1[0] > b2[0]:  # make sure the crops overlap for this seed
        b2 = b2.clone()
    boxes = decon.overlap_boxes(b1, f1, b2, f2)
    maps = [torch.from_numpy(np.asarray(v, dtype=np.float32)).permute(2, 0, 1)[None] for v in (v1, v2)]
    a1 = decon.align_to_overlap(maps[0], boxes[0:1], torch.tensor([f1]))
    a2 = decon.align_to_overlap(maps[1], boxes[1:2], torch.tensor([f2]))
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))  # away from resampling borders
    assert (a1[inner] - a2[inner]).abs()[:, :2].mean() < 2.0  # same (x, y) within ~1% of the image
    # and a known pixel: the aligned top-left shows the overlap's top-left image point
    ox0 = max(b1[0], b2[0]).item() * 255
    assert abs(a1[0, 0, 2:5, 2:5].mean().item() - ox0) < 12


def test_two_crops_always_overlap():
    t = decon.TwoCropsWithOverlap(32, 0.08)
    img = common.synthetic_scene(0, size=64)[0]
    for _ in range(20):
        views, boxes, flips = t(img)
        assert views[0].shape == (3, 32, 32) and boxes.shape == (2, 4) and flips.shape == (2,)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_channel_dropout_is_off_in_eval_mode():
    fpn = common.FPN([8, 16, 32, 64], 16, skip_dropout=0.5, skip_drop_mode="channel")
    feats = [torch.randn(2, c, s, s) for c, s in zip([8, 16, 32, 64], [16, 8, 4, 2])]
    fpn.eval()
    assert all(torch.equal(a, b) for a, b in zip(fpn(feats), fpn(feats)))
    fpn.train()
    assert not torch.equal(fpn(feats)[0], fpn(feats)[0])


def test_alpha_zero_builds_no_encoder_head_and_alpha_one_is_refused():
    args = decon.get_args(["--arch", "resnet18", "--encoder-loss-weight", "0", "--deep-supervision"])
    net = decon.Network(args)
    assert len(net.heads) == 4 and not net.with_encoder_head
    assert all(h.projector[0].in_channels == 256 for h in net.heads)  # decoder heads only
    assert decon.head_weights(args, 4) == [0.25] * 4
    with pytest.raises(SystemExit):
        decon.get_args(["--encoder-loss-weight", "1"])
    with pytest.raises(SystemExit):
        decon.get_args(["--skip-dropout", "0.5", "--skip-channel-dropout", "0.5"])


def test_ema_moves_teacher_decoder_prototypes_once_per_iteration(tmp_path):
    torch.manual_seed(0)
    args = decon.get_args(["--arch", "resnet18", "--dim-hidden", "32", "--image-size", "32"])
    student = decon.Network(args)
    teacher = decon.Network(args)  # different weights on purpose
    s_proto = student.heads[-1].prototypes.weight.detach().clone()
    t_proto = teacher.heads[-1].prototypes.weight.detach().clone()
    decon.ema_update(list(teacher.parameters()), list(student.parameters()), 0.9)
    assert torch.allclose(teacher.heads[-1].prototypes.weight, 0.9 * t_proto + 0.1 * s_proto, atol=1e-6)
    # in a run, the momentum used at step k is schedule[k]: one step of the counter per iteration
    out = tmp_path / "run"
    python("decon.py", *TINY_DECON, "--max-steps", "3", "--epochs", "2", "--output-dir", out)
    logged = [json.loads(l)["teacher_momentum"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(common.momentum_schedule(0.99, 2, 4)[:3])
    ck = common.load_checkpoint(out / "checkpoint.pth")
    s, t = ck["student"]["heads.1.prototypes.weight"], ck["teacher"]["heads.1.prototypes.weight"]
    assert not torch.equal(s, t)  # the teacher's decoder prototypes follow, with lag


@pytest.mark.parametrize("flags", [[], ["--deep-supervision", "--skip-channel-dropout", "0.5"], ["--decoder", "fcn"]])
def test_decon_variants_run_with_finite_losses(tmp_path, flags):
    out = tmp_path / "run"
    python("decon.py", *TINY_DECON, "--max-steps", "2", "--output-dir", out, *flags)
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert math.isfinite(rec["loss"]) and all(math.isfinite(x) for x in rec["head_losses"])


def test_torchrun_two_processes(tmp_path):
    """With whole-map skip dropout: a rank that drops a lateral still gives DDP its (zero) gradient."""
    script = rank_dump_script(tmp_path, "decon")
    torchrun(2, script, *TINY_DECON, "--max-steps", "2", "--skip-dropout", "0.5", "--output-dir", tmp_path / "run")
    assert_ranks_equal(tmp_path, 100)  # student, teacher, predictors


def test_exported_decoder_loads_into_eval_fpn_head(tmp_path):
    out = tmp_path / "run"
    python("decon.py", *TINY_DECON, "--max-steps", "1", "--output-dir", out)
    down = common.load_checkpoint(out / "downstream.pth")
    assert down["method"] == "decon" and down["decoder_cfg"]["type"] == "fpn" and down["decoder_cfg"]["levels"] == ["p2"]
    model = eval_dense.Segmenter("resnet18", "finetune", "fpn", 9, 32)
    missing, unexpected = model.decoder.load_state_dict(down["decoder"], strict=True)
    assert not missing and not unexpected
    ck = common.load_checkpoint(out / "checkpoint.pth")  # the teacher is what downstream gets
    assert torch.equal(down["decoder"]["lateral.0.0.weight"], ck["teacher"]["decoder.lateral.0.0.weight"])
    assert torch.equal(down["backbone"]["conv1.weight"], ck["teacher"]["encoder.conv1.weight"])
    python("eval_dense.py", "--init", out, "--task", "finetune", "--head", "fpn", "--init-decoder", "--synthetic-size", "64",
           "--crop-size", "64", "--synthetic-train", "16", "--synthetic-val", "4", "--iters", "1", "--batch-size", "4",
           "--workers", "0", "--output-dir", tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["init_decoder"] is True


class CollectiveNorm(torch.nn.SyncBatchNorm):
    """A stand-in for CUDA's SyncBatchNorm on gloo: like it, its forward and backward are collectives
    (an all_reduce each), so a rank that skips it leaves the others waiting."""

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            torch.distributed.all_reduce(torch.ones(1))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            torch.distributed.all_reduce(torch.ones(1))
            return g

    def forward(self, x):
        return self._Op.apply(x)


def _slot_worker(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    B, K, D, h = 3, 6, 4, 2
    predictor = torch.nn.Sequential(torch.nn.Linear(D, D), CollectiveNorm(D))
    q_slots, k_slots = torch.randn(B, K, D, requires_grad=True), torch.randn(B, K, D)
    sq, sk = torch.randn(B, K, h, h), torch.randn(B, K, h, h)
    if rank == 1:  # no prototype wins a pixel in both views: no slot is valid in both
        sq[:, 0], sk[:, 1] = 9, 9
    loss = decon.slot_loss(q_slots, k_slots, sq, sk, predictor, 0.2)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": q_slots.grad}, f"{out}/slot{rank}.pt")
    torch.distributed.destroy_process_group()


def test_slot_loss_with_synced_predictor_never_leaves_a_rank_behind(tmp_path):
    """One rank has no valid slot: it must still join the predictor's collectives (a SyncBatchNorm
    under DDP on CUDA), else the job hangs."""
    torch.multiprocessing.spawn(_slot_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"slot{i}.pt", weights_only=True) for i in range(2))
    assert r0["loss"] > 0 and r1["loss"] == 0 and r1["grad"].abs().sum() == 0 and r0["grad"].abs().sum() > 0


def test_slotcon_encoder_zero_inits_residual_gammas_and_fpn_is_c2_xavier():
    args = decon.get_args(["--arch", "resnet18"])
    net = decon.Network(args)
    assert all(b.bn2.weight.abs().sum() == 0 for layer in (net.encoder.layer1, net.encoder.layer4) for b in layer)
    assert net.encoder.bn1.weight.abs().sum() > 0
    conv = net.decoder.output["p2"][0]  # kaiming uniform a=1: std sqrt(1 / fan_in)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(1 / (256 * 9)), rel=0.05)
    import decon_densecl
    dense = decon_densecl.Network(decon_densecl.get_args(["--arch", "resnet18"]))
    assert dense.encoder.layer1[0].bn2.weight.abs().sum() > 0  # DenseCL's ResNet has no zero-init


def test_decoder_heads_options_and_fcn_width():
    args = decon.get_args(["--arch", "resnet18", "--deep-supervision", "--decoder-num-prototypes", "32",
                           "--num-prototypes", "16"])
    net = decon.Network(args)
    assert [h.prototypes.num_embeddings for h in net.heads] == [16, 32, 32, 32, 32]
    fcn = decon.Network(decon.get_args(["--arch", "resnet18", "--decoder", "fcn", "--fcn-channels", "512",
                                        "--fcn-dilation", "1"]))
    assert fcn.decoder[0].out_channels == 512 and fcn.decoder[0].dilation == (1, 1) and fcn.heads[1].projector[0].in_channels == 512


def test_whole_map_skip_dropout_drops_a_level_for_the_batch_without_rescaling():
    torch.manual_seed(0)
    fpn = common.FPN([8, 16, 32, 64], 16, skip_dropout=0.5, skip_drop_mode="map").train()
    x = torch.randn(4, 16, 8, 8)
    outs = [fpn.drop_skip(x) for _ in range(40)]
    assert all(torch.equal(o, x) or o.abs().sum() == 0 for o in outs)  # one draw for the whole batch, no 1/(1-p)
    assert 5 < sum(o.abs().sum() == 0 for o in outs) < 35


def test_warmup_starts_at_one_hundredth_of_the_lr(tmp_path):
    out = tmp_path / "run"
    python("decon.py", *TINY_DECON, "--max-steps", "1", "--warmup-epochs", "1", "--lr", "0.64", "--output-dir", out)
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(0.64 * 8 / 256 / 100)  # SlotCon's GradualWarmupScheduler, multiplier 100


def test_a_dropped_skip_map_still_gives_every_fpn_parameter_a_gradient():
    """DDP without find_unused_parameters needs a gradient for every parameter each step: the
    dropped lateral is multiplied by a 0. coin (zero gradient), not replaced by zeros (no gradient)."""
    fpn = common.FPN([8, 16, 32, 64], 16, skip_dropout=1.0, skip_drop_mode="map").train()
    feats = [torch.randn(2, c, s, s) for c, s in zip([8, 16, 32, 64], [16, 8, 4, 2])]
    sum(p.square().sum() for p in fpn(feats)).backward()
    for name, p in fpn.named_parameters():
        assert p.grad is not None, name
        if name.startswith(("lateral.0.", "lateral.1.", "lateral.2.")):  # C2-C4's laterals, all dropped at p = 1
            assert not p.grad.any(), name


def test_present_prototypes_equal_the_one_hot_formula():
    """slot_loss's validity mask (a scatter of each pixel's argmax into (B, K)) equals the one-hot
    formula it replaced (an int64 (B, h, w, K) tensor: ~400 MB at P2 in the paper's per-GPU batch)."""
    torch.manual_seed(0)
    B, K, h, w = 3, 16, 5, 7
    score = torch.randn(B, K, h, w)
    score[1, :, :, :] = score[1, :1]  # image 1: prototype 0 wins every pixel...
    score[1, 0] += 1
    score[2, :, 0, 0] = 0.0  # ...and a tie at one pixel
    old = F.one_hot(score.argmax(1), K).flatten(1, 2).amax(1).bool()  # (B, K)
    assert old[1].sum() == 1 and 1 < old[0].sum() < K
    mask = decon.present_prototypes(score)
    assert mask.dtype == torch.bool and torch.equal(mask, old)
