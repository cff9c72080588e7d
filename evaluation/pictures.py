"""The pictures eval_dense.py writes next to its metrics (predictions.png): for segmentation, image /
ground truth / prediction / the first three principal components of the features."""
import numpy as np
import torch
from PIL import Image

import common
from evaluation import seg_data


def palette(n):
    """A fixed colour per class; ignore is white."""
    rng = np.random.default_rng(3)
    colours = np.zeros((256, 3), np.uint8)
    colours[:n] = rng.integers(40, 256, (n, 3))
    colours[0] = (0, 0, 0) if n == len(common.SYNTHETIC_CLASSES) else colours[0]
    colours[seg_data.IGNORE] = 255
    return colours


def pca_rgb(feat, size):
    """First three principal components of a (C, h, w) feature map as an RGB image of `size`."""
    C, h, w = feat.shape
    x = feat.float().reshape(C, -1).T  # (h·w, C)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comp = x @ v[:3].T  # (h·w, 3)
    comp = (comp - comp.min(0).values) / (comp.max(0).values - comp.min(0).values + 1e-6)
    img = (comp.T.reshape(3, h, w).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(img).resize(size, Image.NEAREST)


def save_segmentation(rows, num_classes, path, input_norm="imagenet"):
    """PNG grid: one row per image: image | ground truth | prediction | feature PCA."""
    colours = palette(num_classes)
    tiles = []
    for x, y, pred, feat in rows:
        img = seg_data.denormalise(x, input_norm)
        img = Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        tiles.append([img, Image.fromarray(colours[y.numpy().astype(np.uint8)]),
                      Image.fromarray(colours[pred.numpy().astype(np.uint8)]), pca_rgb(feat, img.size)])
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (4 * w, len(tiles) * h), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w, h)), (c * w, r * h))
    grid.save(path)
