"""--gpu-augment (common.py, section 7; decon.py, mcl.py, adclr.py): the device-side views follow the PIL/v2 pipeline's distribution, and each
transform with fixed parameters equals torchvision's within interpolation tolerance."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

import common



def smooth_image(h, w, seed=0):
    """A smooth random colour field in [0, 1] (interpolation differences stay small on it)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)


@pytest.mark.parametrize("h,w,scale", [(375, 500, (0.2, 1.0)), (500, 90, (0.08, 1.0))])
def test_crop_parameters_follow_torchvisions_distribution(h, w, scale):
    torch.manual_seed(0)
    boxes = common.crop_params(torch.tensor([[h, w]], dtype=torch.float).repeat(20000, 1), scale)
    ours = {"area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)).numpy(),
            "log_aspect": torch.log((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])).numpy(),
            "cx": ((boxes[:, 0] + boxes[:, 2]) / 2 / w).numpy()}
    ref = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
                    for _ in range(5000)], dtype=float)  # (i, j, h, w)
    theirs = {"area": ref[:, 2] * ref[:, 3] / (h * w), "log_aspect": np.log(ref[:, 3] / ref[:, 2]),
              "cx": (ref[:, 1] + ref[:, 3] / 2) / w}
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes[:, :2] >= 0).all()
    for k in ours:  # means and spreads within 4 standard errors of torchvision's sample
        se = theirs[k].std() / math.sqrt(len(theirs[k])) + 1e-9
        assert abs(ours[k].mean() - theirs[k].mean()) < 4 * se, k
        assert abs(ours[k].std() - theirs[k].std()) < 0.05 * theirs[k].std() + 1e-6, k


@pytest.mark.parametrize("box", [(10, 20, 90, 120), (0, 0, 300, 200), (50, 30, 250, 190)])
def test_a_fixed_crop_equals_torchvisions_resized_crop(box):
    img = smooth_image(200, 300)
    x0, y0, x1, y1 = box
    ours = common.resized_crops(img, torch.tensor([box], dtype=torch.float), 96)
    theirs = TF.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [96, 96], antialias=True)
    assert (ours - theirs).abs().mean() < 2e-3 and (ours - theirs).abs().max() < 3e-2


def test_fixed_colour_factors_equal_torchvisions():
    x = torch.rand(4, 3, 16, 16)
    one, zero = torch.ones(4), torch.zeros(4)
    f = torch.tensor([0.6, 0.9, 1.2, 1.4])
    hue = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    cases = [(0, f, TF.adjust_brightness), (1, f, TF.adjust_contrast), (2, f, TF.adjust_saturation),
             (3, hue, TF.adjust_hue)]
    for position, values, fn in cases:  # one op away from identity: the random order cannot matter
        factors = [one, one, one, zero]
        factors[position] = values
        ours = common.color_jitter(x, *factors)
        theirs = torch.stack([fn(x[i], float(v)) for i, v in enumerate(values)])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(common.gray(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_a_fixed_blur_equals_torchvisions():
    x = torch.rand(3, 3, 40, 40)
    sigma = torch.tensor([0.1, 0.8, 2.0])
    k = common.blur_kernel(40)
    ours = common.gaussian_blur(x, sigma, k)
    theirs = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _moments(a, b):
    """Per-view colour moments of two stacks of views agree in distribution: brightness, contrast,
    colourfulness (0 for grayscale views)."""
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)), lambda v: v.std(1).mean((1, 2))):
        sa, sb = stat(a), stat(b)
        se = math.sqrt(sa.var() / len(sa) + sb.var() / len(sb))  # of the difference of the means
        se_std = math.sqrt(sa.var() / (2 * len(sa)) + sb.var() / (2 * len(sb)))  # of the stds' (normal approx.)
        assert abs(sa.mean() - sb.mean()) < 4 * se and abs(sa.std() - sb.std()) < 4 * se_std


def _images(n=96, size=72):
    torch.manual_seed(0)
    np.random.seed(0)
    return [common.synthetic_scene(i, size=size)[0] for i in range(n)]


def _decoded(imgs, repeat):
    return common.pad_collate([common.DecodeOnly()(img) for img in imgs for _ in range(repeat)])


def test_moco_views_match_the_pil_pipelines_statistics():
    imgs = _images()
    cpu = common.moco_v2_augmentation(64)
    a = torch.stack([cpu(img) for img in imgs for _ in range(4)])  # (384, 3, 64, 64)
    b = torch.cat(common.MoCoV2Views(64)(_decoded(imgs, 2), torch.device("cpu")))  # (384, 3, 64, 64)
    assert a.shape == b.shape
    _moments(a, b)


def test_decon_views_boxes_and_flips_match_the_cpu_pipeline():
    import decon
    imgs = _images()
    cpu = decon.TwoCropsWithOverlap(64, 0.08)
    out = [cpu(img) for img in imgs for _ in range(3)]
    views, boxes, flips = decon.OverlappingViews(64, 0.08)(_decoded(imgs, 3), torch.device("cpu"))
    assert boxes.shape == (288, 2, 4) and flips.shape == (288, 2) and views[0].shape == (288, 3, 64, 64)
    for k in (0, 1):  # view 2 is the solarized branch
        _moments(torch.stack([o[0][k] for o in out]), views[k])
    area = lambda bx: ((bx[..., 2] - bx[..., 0]) * (bx[..., 3] - bx[..., 1]))  # the overlap's share of each view
    _moments(area(torch.stack([o[1] for o in out]))[:, :, None, None], area(boxes)[:, :, None, None])
    assert (boxes >= -1e-6).all() and (boxes <= 1 + 1e-6).all()


def test_batched_overlap_boxes_equal_the_per_image_ones():
    import decon
    torch.manual_seed(0)
    b1, b2 = common.crop_params(torch.tensor([[60.0, 80.0]]).repeat(2 * 16, 1), (0.3, 1.0)).div(torch.tensor([80.0, 60.0] * 2)).split(16)
    f1, f2 = torch.rand(16) < 0.5, torch.rand(16) < 0.5
    batched = decon.overlap_boxes(b1, f1, b2, f2)
    torch.testing.assert_close(batched, torch.stack([decon.overlap_boxes(b1[i], bool(f1[i]), b2[i], bool(f2[i]))
                                                     for i in range(16)]))


def test_mcl_and_adclr_views_match_the_cpu_pipelines():
    import adclr
    import mcl
    imgs = _images(48)
    cpu = [mcl.EightCrops(64)(img) for img in imgs for _ in range(2)]
    gpu = mcl.EightCropViews(64)(_decoded(imgs, 2), torch.device("cpu"))
    assert len(gpu) == 8 and gpu[0].shape == (96, 3, 64, 64)
    for k in (0, 7):  # a view of each branch
        _moments(torch.stack([c[k] for c in cpu]), gpu[k])
    a = adclr.get_args(["--global-size", "64", "--local-size", "32", "--local-crops", "2", "--num-queries", "4",
                        "--query-size", "16", "--query-augment", "local"])
    cpu = [adclr.MultiCropWithQueries(a)(img) for img in imgs for _ in range(2)]
    g, l, q = adclr.MultiCropViews(a)(_decoded(imgs, 2), torch.device("cpu"))
    assert len(g) == 2 and len(l) == 2 and q.shape == (96, 4, 3, 16, 16) and l[0].shape == (96, 3, 32, 32)
    _moments(torch.stack([c[0][1] for c in cpu]), g[1])
    _moments(torch.stack([c[1][0] for c in cpu]), l[0])
    _moments(torch.stack([c[2] for c in cpu]).flatten(0, 1), q.flatten(0, 1))


def test_solarize_equals_torchvisions():
    x = torch.rand(2, 3, 8, 8)
    ours = common.device_colour(x, (0, 0, 0, 0), 0.0, 0.0, 0.0, 1.0, 3)
    torch.testing.assert_close(ours, common.normalise(TF.solarize(x, 128 / 255)))


def test_decode_only_caps_the_long_side_and_pads():
    img = common.synthetic_scene(0, size=100)[0].resize((100, 60))
    x = common.DecodeOnly(max_side=50)(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 30, 50)
    images, sizes = common.pad_collate([x, common.DecodeOnly()(img)])
    assert images.shape == (2, 3, 60, 100) and sizes.tolist() == [[30, 50], [60, 100]] and images[0, :, 30:].sum() == 0


def test_device_pipelines_make_every_tensor_on_the_images_device():
    """On the meta device any tensor made on the CPU and combined with the batch fails ("Tensor on
    device cpu is not on the expected device meta"): the CUDA path's device mix-ups, caught on a CPU."""
    import adclr
    import decon
    import mcl
    meta = torch.device("meta")
    batch = (torch.randint(0, 256, (4, 3, 80, 96), dtype=torch.uint8), torch.tensor([[80, 96]] * 4))
    a = adclr.get_args(["--global-size", "64", "--local-size", "32", "--local-crops", "2", "--num-queries", "4",
                        "--query-size", "16"])
    views = {"moco": common.MoCoV2Views(64)(batch, meta), "decon": decon.OverlappingViews(64, 0.08)(batch, meta),
             "mcl": mcl.EightCropViews(64)(batch, meta), "adclr": adclr.MultiCropViews(a)(batch, meta)}
    tensors = [t for out in views.values() for t in _flat(out)]
    assert len(tensors) > 15 and all(t.device == meta for t in tensors)


def _flat(x):
    return [t for v in x for t in _flat(v)] if isinstance(x, (list, tuple)) else [x]
