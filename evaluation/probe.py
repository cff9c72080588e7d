"""--probe-cache for eval_dense.py: the frozen backbone's features of the synthetic training scenes
computed once, then the linear head trained on them to convergence (the miniature's probe)."""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common
from evaluation import seg_data


def bilinear_matrix(n_in, n_out, device=None, dtype=torch.float32):
    """(n_out, n_in) weights of 1-D bilinear resizing with align_corners=False, as F.interpolate
    computes them (source x = (i + 0.5) * n_in / n_out - 0.5, clamped at 0; no antialiasing)."""
    x = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = x.floor().long().clamp(max=n_in - 1)
    i1, lam = (i0 + 1).clamp(max=n_in - 1), x - i0
    rows = torch.arange(n_out, device=device)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    return m.index_put_((rows, i1), lam, accumulate=True).to(dtype)


def cached_probe(model, args, device, dtype, log):
    """--probe-cache: the frozen backbone's features of every training scene (as generated, no
    augmentation) computed once; then the linear head (model.head) trained on them with AdamW at
    --lr, cosine, --probe-epochs epochs of --batch-size, with the loss on logits upsampled to the
    labels, as the validation scores them. Cheap enough to train the probe to convergence."""
    if args.data != "synthetic" or common.world_size() > 1:
        raise SystemExit("--probe-cache holds every training feature map in memory: it is for --data synthetic "
                         "in one process (use the plain probe, with --iters, for real datasets)")
    scenes = common.SyntheticScenes(args.synthetic_train, args.synthetic_size, seed=args.seed, split="train",
                                    transform=seg_data.val_transform, with_labels=True, style=args.synthetic_style)
    feats, labels = [], []
    model.eval()
    with torch.no_grad(), common.autocast(device, dtype):
        for x, y in DataLoader(scenes, batch_size=64, num_workers=args.workers):
            feats.append(model.features(x.to(device)).float())
            labels.append(y.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)  # (N, C, h, w), (N, H, W)
    head = model.head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.probe_epochs * -(-len(feats) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(args.seed)
    # Bilinear upsampling as two matmuls: F.interpolate's result to float rounding, with a cheaper
    # backward on a CPU (this loop is most of the probe's time there).
    rows, cols = (bilinear_matrix(n, N, device) for n, N in zip(feats.shape[-2:], labels.shape[-2:]))
    for epoch in common.progress(range(args.probe_epochs), 0, 1):
        total = torch.zeros((), device=device)
        for idx in torch.randperm(len(feats), generator=generator).split(args.batch_size):
            idx = idx.to(device)
            logits = torch.einsum("Hh,bchw,Ww->bcHW", rows, head(feats[idx]), cols)  # (b, classes, H, W)
            loss = F.cross_entropy(logits, labels[idx], ignore_index=seg_data.IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(idx)
        log.write(step=epoch + 1, loss=total.item() / len(feats), lr=schedule.get_last_lr()[0])
