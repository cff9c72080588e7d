"""gpu_augment.py: the device-side views follow the PIL/v2 pipeline's distribution, and each
transform with fixed parameters equals torchvision's within interpolation tolerance."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

import common
import gpu_augment as ga


def smooth_image(h, w, seed=0):
    """A smooth random colour field in [0, 1] (interpolation differences stay small on it)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)


@pytest.mark.parametrize("h,w,scale", [(375, 500, (0.2, 1.0)), (500, 90, (0.08, 1.0))])
def test_crop_parameters_follow_torchvisions_distribution(h, w, scale):
    torch.manual_seed(0)
    boxes = ga.crop_params(torch.tensor([[h, w]], dtype=torch.float).repeat(20000, 1), scale)
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
    ours = ga.resized_crops(img, torch.tensor([box], dtype=torch.float), 96)
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
        ours = ga.color_jitter(x, *factors)
        theirs = torch.stack([fn(x[i], float(v)) for i, v in enumerate(values)])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ga.gray(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_a_fixed_blur_equals_torchvisions():
    x = torch.rand(3, 3, 40, 40)
    sigma = torch.tensor([0.1, 0.8, 2.0])
    k = common.blur_kernel(40)
    ours = ga.gaussian_blur(x, sigma, k)
    theirs = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_views_match_the_pil_pipelines_statistics():
    # The same images through both pipelines: per-view colour moments agree in distribution.
    torch.manual_seed(0)
    np.random.seed(0)
    imgs = [common.synthetic_scene(i, size=72)[0] for i in range(96)]
    cpu = common.moco_v2_augmentation(64)
    a = torch.stack([cpu(img) for img in imgs for _ in range(4)])  # (384, 3, 64, 64)
    batch = ga.pad_collate([ga.DecodeOnly()(img) for img in imgs for _ in range(2)])
    b = torch.cat(ga.MoCoV2Views(64)(batch, torch.device("cpu")))  # (384, 3, 64, 64)
    assert a.shape == b.shape
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)), lambda v: v.std(1).mean((1, 2))):
        sa, sb = stat(a), stat(b)  # per view; the last one: colourfulness (0 for grayscale views)
        se = math.sqrt(sa.var() / len(sa) + sb.var() / len(sb))  # of the difference of the means
        assert abs(sa.mean() - sb.mean()) < 4 * se and abs(sa.std() - sb.std()) < 0.15 * sa.std()


def test_decode_only_caps_the_long_side_and_pads():
    img = common.synthetic_scene(0, size=100)[0].resize((100, 60))
    x = ga.DecodeOnly(max_side=50)(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 30, 50)
    images, sizes = ga.pad_collate([x, ga.DecodeOnly()(img)])
    assert images.shape == (2, 3, 60, 100) and sizes.tolist() == [[30, 50], [60, 100]] and images[0, :, 30:].sum() == 0
