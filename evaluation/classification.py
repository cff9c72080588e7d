"""Image-level protocols of eval_dense.py on frozen features: `--task knn` and `--task linear`.

- knn, as DINO's eval_knn.py: the frozen network's features (a ResNet's global-pooled C5, a ViT's
  [CLS] token after the last norm) of every training image, computed once without augmentation
  (resize to 256/224 of the crop, bicubic, centre crop), L2-normalised; each validation image takes a
  weighted vote of its k = 20 most similar training images, weight exp(cosine / 0.07); top-1 and
  top-5 accuracy.
- linear, each paper's protocol: for a ResNet MoCo's main_lincls.py (the backbone frozen in eval
  mode, a linear layer on the pooled C5 initialised N(0, 0.01), SGD lr 30 at batch 256, momentum 0.9,
  no weight decay, 100 epochs, lr x0.1 at epochs 60 and 80; RandomResizedCrop + flip; validation
  resize 256 (bilinear), centre crop 224); for a ViT DINO's eval_linear.py (the [CLS] tokens of the last 4
  blocks concatenated, each after the last norm; ViT-B: the last block's [CLS] and its mean patch
  token; SGD lr 0.001 x batch / 256 at batch 1024, cosine per epoch to 0, 100 epochs; bicubic
  validation resize).

Data: --data imagenet (<data-root>/imagenet/{train,val}/<class>/*, the torchvision ImageFolder
layout), a folder with train/ and val/ in that layout, or the synthetic scenes, whose image-level
label is the class of the scene's largest visible object (8 classes).

Both validate after every epoch and report the best top-1 (MoCo's best_acc1, DINO's "max
accuracy"), as metrics.json's top1 (with its epoch, best_epoch); top1_last is the last epoch's, the
number that involves no selection on the validation set.

Deviations: the lr follows the linear scaling rule at other batch sizes (MoCo fixes 30 for its 256);
DINO's features interleave the [CLS] and
mean patch token element-wise for ViT-B, this concatenates them (the same numbers in another order).
"""
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import common
from evaluation import weights

PROTOCOLS = {  # the linear protocol of each backbone family, from the papers' code
    "moco": dict(epochs=100, batch_size=256, lr=30.0, milestones=(0.6, 0.8)),  # main_lincls.py: x0.1 at 60, 80 of 100
    "dino": dict(epochs=100, batch_size=1024, lr=0.001, milestones=None),  # eval_linear.py: 128 x 8 GPUs; cosine per epoch
}  # lr: per 256 images, scaled linearly with --batch-size (DINO's rule; MoCo's 30 is for its 256)


def defaults(args, arch):
    """--task knn / linear: the linear protocol of the network's paper (MoCo's for a ResNet, DINO's
    for a ViT: PROTOCOLS), the features, the per-rank batch (k-NN: 256 images per step)."""
    vit = arch.startswith("vit")
    args.linear_protocol = "dino" if vit else "moco"
    protocol = PROTOCOLS[args.linear_protocol]
    args.epochs = args.epochs or protocol["epochs"]
    args.batch_size = args.batch_size or (protocol["batch_size"] if args.task == "linear" else 256)
    args.lr = protocol["lr"] * args.batch_size / 256 if args.lr is None else args.lr  # both papers' lr is per 256 images
    args.milestones = protocol["milestones"]
    base = arch == "vit_base"  # DINO: ViT-B takes its last block's [CLS] and mean patch token
    args.n_last_blocks = args.n_last_blocks or (1 if base or not vit or args.task == "knn" else 4)
    args.avgpool_patchtokens = args.avgpool_patchtokens or ("on" if base and args.task == "linear" else "off")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group starts later
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    args.world_size, args.batch_per_rank = world, args.batch_size // world


# =================================================================================================
# Data: ImageNet-layout folders and the synthetic scenes' image-level label
# =================================================================================================
def largest_object(label):
    """The image-level label of a synthetic scene from its label map: the class (0-7) of its largest
    visible object (ties: the lower class)."""
    return int(np.bincount(label.ravel(), minlength=len(common.SYNTHETIC_CLASSES))[1:].argmax())  # pixels per class


class SyntheticImages(Dataset):
    """Synthetic scenes with their image-level label: (transform(image), label)."""

    def __init__(self, length, size, seed, split, transform, style="colour"):
        self.scenes = common.SyntheticScenes(length, size, seed, split, style=style)
        self.transform, self.classes = transform, list(common.SHAPES)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        img, label = common.synthetic_scene(self.scenes.offset + i, self.scenes.seed, self.scenes.size, style=self.scenes.style)
        return self.transform(img), largest_object(label)


class ImageFolderFiles(Dataset):
    """<root>/<class>/<image> (torchvision's ImageFolder layout): (transform(image), class index).
    An unreadable image is skipped with one warning: training reads the next one; evaluation gives
    None, which collate_skip leaves out (and out of the accuracy)."""

    def __init__(self, root, transform, train, classes=None):
        root = Path(root)
        self.classes = classes or class_folders(root)  # validation takes the training split's numbering
        self.samples = [(f, c) for c, name in enumerate(self.classes) if (root / name).is_dir()
                        for f in common.find_images(root / name)]
        if not self.samples:
            raise SystemExit(f"--data: no images in {root}/<class>/* (the ImageFolder layout: one folder per class, "
                             f"train/ and val/ below the --data folder)")
        self.transform, self.train, self.warn_once = transform, train, common.WarnOnce()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(i + attempt) % len(self.samples)]
            try:
                return self.transform(common.open_rgb(path)), label
            except Exception as e:
                self.warn_once(path, f"skipping unreadable image {path}: {type(e).__name__}: {e}")
                if not self.train:
                    return None, label
        raise SystemExit("no readable image in the dataset")


def class_folders(root):
    """The class names of an ImageFolder-layout folder: its sub-folders, sorted."""
    return sorted(d.name for d in Path(root).iterdir() if d.is_dir()) if Path(root).is_dir() else []


def collate_skip(batch):
    """Stack a batch, leaving out the images that could not be read (None)."""
    batch = [b for b in batch if b[0] is not None]
    return (torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])) if batch else (None, None)


def transforms(crop, train, bicubic=True):
    """MoCo's and DINO's: training RandomResizedCrop + flip; evaluation (and k-NN's training
    features) resize to 256/224 of the crop and centre crop, bicubic as DINO, bilinear as MoCo's
    main_lincls.py (torchvision's default). ImageNet mean / std."""
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    if train:
        return v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), *tail])
    mode = v2.InterpolationMode.BICUBIC if bicubic else v2.InterpolationMode.BILINEAR
    return v2.Compose([v2.Resize(round(crop * 256 / 224), interpolation=mode, antialias=True), v2.CenterCrop(crop), *tail])


def dataset(args, split, train_transform):
    """The split ("train" or "val") of --data with its transform; returns (dataset, class names)."""
    transform = transforms(args.crop_size, train_transform,
                           bicubic=args.task == "knn" or args.linear_protocol == "dino")  # MoCo's: bilinear
    if args.data == "synthetic":
        n = args.synthetic_train if split == "train" else args.synthetic_val
        ds = SyntheticImages(n, args.synthetic_size, args.seed, split, transform, args.synthetic_style)
    else:
        root = Path(args.data_root) / "imagenet" if args.data == "imagenet" else Path(args.data)
        classes = class_folders(root / "train")  # one numbering for both splits: train/'s
        unknown = sorted(set(class_folders(root / split)) - set(classes))
        if unknown:
            raise SystemExit(f"--data {root}: {split}/ has class folders that train/ lacks ({', '.join(unknown[:10])}"
                             f"{' ...' if len(unknown) > 10 else ''}): no classifier can predict them. Remove them from "
                             f"{split}/ or add their training images to train/")
        ds = ImageFolderFiles(root / split, transform, train=train_transform, classes=classes or None)
    return ds, ds.classes


# =================================================================================================
# Features: pooled C5, the [CLS] token, the last blocks' [CLS] tokens
# =================================================================================================
def build_backbone(args, backbone_state, meta, arch):
    """The frozen network of --init (eval mode, no gradients)."""
    if arch.startswith("vit"):
        patch, img_size = (weights.vit_geometry(backbone_state, meta, args.patch_size)
                           if backbone_state is not None else (args.patch_size or 16, args.crop_size))
        net = common.ViT(arch, patch, img_size)
    else:
        net = common.ResNetTrunk(arch)
    if backbone_state is not None:
        weights.load_backbone(net, backbone_state, arch, meta, args.init)
    return net.eval().requires_grad_(False)


def features(net, x, n_last_blocks=1, avgpool=False):
    """(B, D) frozen features: a ResNet's global-average-pooled C5; a ViT's [CLS] after the last norm,
    or (DINO's linear protocol) the [CLS] of each of the last n blocks after the last norm,
    concatenated, and with avgpool the last block's mean patch token too."""
    if not isinstance(net, common.ViT):
        return net(x).mean((2, 3))  # (B, C)
    h, w = x.shape[-2] // net.patch_size, x.shape[-1] // net.patch_size
    tokens = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), net.embed(x)], 1) + net.pos_for(h, w)
    outs = []
    for i, blk in enumerate(net.blocks):
        tokens = blk(tokens)
        if i >= len(net.blocks) - n_last_blocks:
            outs.append(net.norm(tokens))  # (B, 1 + N, D)
    feats = [o[:, 0] for o in outs]
    if avgpool:
        feats.append(outs[-1][:, 1:].mean(1))
    return torch.cat(feats, -1)  # (B, D·(n + avgpool))


@torch.no_grad()
def extract(net, ds, args, device, dtype):
    """Features and labels of a whole dataset, in its order, on every rank: each rank computes its
    share (every world-th image), then all of them are gathered; unreadable images left out."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loader = DataLoader(ds, batch_size=args.batch_per_rank, sampler=list(range(rank, len(ds), world)),
                        num_workers=args.workers, collate_fn=collate_skip)
    feats, labels = [], []
    for x, y in common.progress(loader, 0, 1):
        if x is None:
            continue
        with common.autocast(device, dtype):
            feats.append(features(net, x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    f = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if world > 1:  # every rank gets everyone's rows (ranks may hold a few more or fewer)
        parts = [None] * world
        dist.all_gather_object(parts, (f.cpu(), y.cpu()))
        f, y = torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)
    return f, y


# =================================================================================================
# k-NN (DINO's eval_knn.py)
# =================================================================================================
@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k, temperature, num_classes, chunk=256):
    """DINO's weighted k-NN vote. train_f (N, D), test_f (M, D) L2-normalised; labels (N,), (M,).
    Each test image sums exp(cosine / T) per class over its k nearest training images; returns
    (top-1, top-5) accuracy in percent (top-5 over min(5, k) votes, as DINO)."""
    top1 = top5 = 0
    k = min(k, len(train_f))
    for c in range(0, len(test_f), chunk):  # chunks of test images: the (chunk, N) similarities fit in memory
        sim = test_f[c:c + chunk] @ train_f.T  # (b, N)
        dist_k, idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(idx), num_classes, device=sim.device)  # (b, C)
        votes.scatter_add_(1, train_y[idx], dist_k.div(temperature).exp())
        pred = votes.argsort(1, descending=True)  # (b, C)
        correct = pred.eq(test_y[c:c + chunk, None])  # (b, C)
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :min(5, k)].sum().item()
    return 100.0 * top1 / max(len(test_f), 1), 100.0 * top5 / max(len(test_f), 1)


def run_knn(args, net, out, device, dtype):
    """--task knn: the features of both splits once, then the vote."""
    train_ds, classes = dataset(args, "train", train_transform=False)  # DINO: no augmentation for the bank
    val_ds, _ = dataset(args, "val", train_transform=False)
    common.write_run_record(out, args)  # once the data is found: a refused start leaves nothing behind
    common.print0(f"k-NN | k {args.k}, T {args.knn_temperature} | {len(train_ds)} train / {len(val_ds)} val images, "
                  f"{len(classes)} classes | crop {args.crop_size}")
    train_f, train_y = extract(net, train_ds, args, device, dtype)
    val_f, val_y = extract(net, val_ds, args, device, dtype)
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    k = min(args.k, len(train_f))
    if k < args.k:
        common.print0(f"--k {args.k} is more than the {len(train_f)} training images: k-NN votes with k = {k}")
    top1, top5 = knn_classify(train_f, train_y, val_f, val_y, k, args.knn_temperature, len(classes))
    return dict(top1=top1, top5=top5, k=k, k_asked=args.k, temperature=args.knn_temperature, train_images=len(train_f),
                val_images=len(val_f))


# =================================================================================================
# Linear (MoCo's main_lincls.py for ResNets, DINO's eval_linear.py for ViTs)
# =================================================================================================
def linear_lr(epoch, args):
    """The lr of an epoch: MoCo's x0.1 at 60% and 80% of the epochs (60 and 80 of 100), or DINO's
    CosineAnnealingLR stepped per epoch, lr·(1 + cos(pi·e/E))/2."""
    if args.milestones:
        return args.lr * 0.1 ** sum(epoch >= round(m * args.epochs) for m in args.milestones)
    return args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))


@torch.no_grad()
def accuracy(net, classifier, ds, args, device, dtype):
    """Top-1 / top-5 of the frozen net + classifier on a dataset, counts summed over ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loader = DataLoader(ds, batch_size=args.batch_per_rank, sampler=list(range(rank, len(ds), world)),
                        num_workers=args.workers, collate_fn=collate_skip)
    counts = torch.zeros(3, device=device)  # top-1, top-5, images
    for x, y in common.progress(loader, 0, 1):
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device)
        with common.autocast(device, dtype):
            logits = classifier(features(net, x, args.n_last_blocks, args.avgpool_patchtokens == "on").float())
        pred = logits.float().topk(min(5, logits.shape[1]), 1).indices  # (b, 5)
        counts += torch.stack([pred[:, 0].eq(y).sum(), pred.eq(y[:, None]).any(1).sum(), torch.tensor(len(y), device=device)]).float()
    if world > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2].clamp(min=1)).item(), (100 * counts[1] / counts[2].clamp(min=1)).item()


def run_linear(args, net, out, device, dtype, log):
    """--task linear: a linear layer on the frozen features, trained with the paper's protocol
    (resumable, DDP, the backbone in eval mode throughout), then evaluated on the val split."""
    train_ds, classes = dataset(args, "train", train_transform=True)
    val_ds, _ = dataset(args, "val", train_transform=False)
    world = common.world_size()
    with torch.no_grad():
        dim = features(net, torch.zeros(1, 3, args.crop_size, args.crop_size, device=device), args.n_last_blocks,
                       args.avgpool_patchtokens == "on").shape[1]
    classifier = nn.Linear(dim, len(classes)).to(device)
    nn.init.normal_(classifier.weight, 0, 0.01)  # MoCo's and DINO's init
    nn.init.zeros_(classifier.bias)
    loader = common.make_loader(train_ds, args.batch_per_rank, args.workers, args.seed, device)
    steps_per_epoch, total = len(loader), args.epochs * len(loader)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ckpt_path = out / "checkpoint.pth"
    step, ckpt = common.resume(ckpt_path, {"classifier": classifier}, optimizer, scaler, device, args, log)
    history = ckpt["val_accuracy"].tolist() if ckpt is not None and "val_accuracy" in ckpt else []  # [top-1, top-5] per epoch
    common.print0(f"linear ({args.linear_protocol}'s protocol) | {dim}-d features -> {len(classes)} classes | "
                  f"{len(train_ds)} train / {len(val_ds)} val images | {args.epochs} epochs x {steps_per_epoch} steps, "
                  f"batch {args.batch_size}, lr {args.lr:g}, " + (f"x0.1 at epochs {[round(m * args.epochs) for m in args.milestones]}"
                                                                 if args.milestones else "cosine per epoch"))
    model = nn.parallel.DistributedDataParallel(classifier) if world > 1 else classifier
    running, tick, tick_step = torch.zeros((), device=device), time.time(), step
    save = lambda: common.save_checkpoint(ckpt_path, {"classifier": classifier}, optimizer, scaler, step, args,
                                          losses=running, extra={"val_accuracy": torch.tensor(history).view(-1, 2)})
    common.catch_stop_signals()
    for epoch in range(step // steps_per_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = (step - epoch * steps_per_epoch) * args.batch_per_rank  # mid-epoch resume
        for g in optimizer.param_groups:
            g["lr"] = linear_lr(epoch, args)
        net.eval()  # frozen: BatchNorm keeps its statistics (MoCo calls model.eval() every epoch)
        bar = common.progress(loader, epoch, args.epochs)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), common.autocast(device, dtype):
                f = features(net, x, args.n_last_blocks, args.avgpool_patchtokens == "on")
            loss = F.cross_entropy(model(f.float()), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach()
            step += 1
            stop = common.stop_requested()
            if step % args.log_every == 0 or step == total or stop:
                common.check_finite(running, {"classifier": classifier}, step, ckpt_path)
                mean = common.mean_over_ranks(running).item() / (step - tick_step)
                speed = (step - tick_step) * args.batch_size / (time.time() - tick)
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{linear_lr(epoch, args):.4g}", img_s=f"{speed:.0f}")
                log.write(step=step, epoch=epoch, loss=mean, lr=linear_lr(epoch, args), images_per_s=speed)
                running.zero_()
                tick, tick_step = time.time(), step
            if step % args.save_every == 0 or stop:
                save()
            if stop:
                common.exit_on_signal(stop, step, ckpt_path)
        loader.sampler.skip = 0
        if len(history) == epoch:  # validated every epoch, as main_lincls.py and eval_linear.py (val_freq 1)
            history.append(list(accuracy(net, classifier, val_ds, args, device, dtype)))
            log.write(step=step, epoch=epoch, val_top1=history[-1][0], val_top5=history[-1][1])
            common.print0(f"epoch {epoch}: val top-1 {history[-1][0]:.2f} (best {max(h[0] for h in history):.2f})")
        save()
    best = max(range(len(history)), key=lambda e: history[e][0])  # the first epoch of the best top-1
    return dict(top1=history[best][0], top5=history[best][1], best_epoch=best, top1_last=history[-1][0],
                top5_last=history[-1][1], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                protocol=args.linear_protocol, feature_dim=dim)


def run(args, backbone_state, meta, arch):
    """eval_dense.py --task knn | linear: the frozen network, the protocol, metrics.json."""
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out = common.prepare_output(args, Path(__file__).resolve().parents[1] / "eval_dense.py")
    log = common.JsonLog(out / "log.jsonl")
    dtype = common.amp_dtype(args.amp, device)
    net = build_backbone(args, backbone_state, meta, arch).to(device)
    if args.task == "knn":
        results = run_knn(args, net, out, device, dtype)
    else:
        results = run_linear(args, net, out, device, dtype, log)
    results.update(task=args.task, init=args.init, method=meta.get("method"), arch=arch, data=args.data)
    if common.is_main():
        (out / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False))
        last = f" (best epoch {results['best_epoch']}; last epoch {results['top1_last']:.2f})" if args.task == "linear" else ""
        print(f"\n{args.task}: top-1 {results['top1']:.2f}{last}  top-5 {results['top5']:.2f}  ({args.init}) -> "
              f"{out / 'metrics.json'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results
