"""Every method's schedules equal its official code's, value by value: each official schedule is
transcribed below as the official code computes it (a loop over iterations or epochs), and compared
with what the method file hands its training loop."""
import math

import numpy as np
import pytest

import adclr
import decon
import decon_densecl
import densecl
import mcl
import moco

SPE = 7  # steps per epoch: not a divisor of anything, so an off-by-one shows


def moco_official(base, epochs, spe):
    """main_moco.py adjust_learning_rate with --cos, called once per epoch (0-based)."""
    return [base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) for epoch in range(epochs) for _ in range(spe)]


def mmcv_cosine_by_epoch(base, epochs, spe, min_lr=0.0):
    """OpenSelfSup / mmcv CosineAnnealingLrUpdaterHook with by_epoch=True (DenseCL's configs)."""
    return [min_lr + (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2
            for epoch in range(epochs) for _ in range(spe)]


def slotcon_official(base, epochs, warmup_epochs, spe, final=1e-6):
    """SlotCon's scheduler (utils/lr_scheduler.py): GradualWarmupScheduler, multiplier 100, from
    base/100, then CosineAnnealingLR's closed form per iteration."""
    warmup, t_max = warmup_epochs * spe, (epochs - warmup_epochs) * spe
    out = []
    for t in range(epochs * spe):
        if t < warmup:
            out.append(base / 100 * (99 * t / warmup + 1))
        else:
            out.append(final + (base - final) * (1 + math.cos(math.pi * (t - warmup) / t_max)) / 2)
    return out


def dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0):
    """DINO's utils.cosine_scheduler."""
    warmup_iters = warmup_epochs * niter
    warmup = list(np.linspace(start_warmup_value, base, warmup_iters)) if warmup_epochs > 0 else []
    iters = list(range(epochs * niter - warmup_iters))
    return warmup + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters]


def mcl_official(base, min_lr, epochs, warmup_epochs, ratio, spe):
    """MCL's config: mmcv CosineAnnealing by iteration over all iterations, times the linear warm-up
    factor 1 - (1 - i / W)(1 - ratio) while i < W."""
    total, warmup = epochs * spe, warmup_epochs * spe
    out = []
    for i in range(total):
        lr = min_lr + (base - min_lr) * (1 + math.cos(math.pi * i / total)) / 2
        out.append(lr * (1 - (1 - i / warmup) * (1 - ratio)) if i < warmup else lr)
    return out


def close(ours, official):
    assert len(ours) == len(official)
    np.testing.assert_allclose(ours, official, rtol=1e-12, atol=1e-15)


def test_moco_densecl_and_decon_densecl_step_a_cosine_per_epoch():
    a = moco.get_args(["--epochs", "5", "--lr", "0.3"])
    close(moco.schedule(a, SPE), moco_official(0.3, 5, SPE))
    for module in (densecl, decon_densecl):
        a = module.get_args(["--epochs", "5", "--lr", "0.3"])
        close(module.schedule(a, SPE), mmcv_cosine_by_epoch(0.3, 5, SPE))


def test_slotcon_warmup_from_one_hundredth_then_a_per_step_cosine():
    a = decon.get_args(["--epochs", "6", "--warmup-epochs", "2", "--batch-size", "256", "--lr", "1.0"])
    lr, momentum = decon.schedules(a, SPE)
    close(lr, slotcon_official(1.0, 6, 2, SPE))
    total = 6 * SPE  # SlotCon's teacher momentum: 1 - (1 - m0)(cos(pi k / K) + 1) / 2, k = 0..K-1
    close(momentum, [1 - (1 - 0.99) * (math.cos(math.pi * k / total) + 1) / 2 for k in range(total)])


def test_dino_warmup_ends_on_the_base_lr():
    a = adclr.get_args(["--epochs", "6", "--warmup-epochs", "2", "--warmup-teacher-temp-epochs", "3",
                        "--batch-size", "256", "--lr", "0.0005"])
    lr, wd, momentum, temp = adclr.schedules(a, SPE)
    close(lr, dino_cosine_scheduler(0.0005, a.min_lr, 6, SPE, warmup_epochs=2))
    assert lr[2 * SPE - 1] == pytest.approx(0.0005)  # the warm-up's last step is the base lr (linspace endpoint)
    close(wd, dino_cosine_scheduler(a.weight_decay, a.weight_decay_end, 6, SPE))
    close(momentum, dino_cosine_scheduler(a.momentum_teacher, 1, 6, SPE))
    official_temp = np.concatenate((np.linspace(a.warmup_teacher_temp, a.teacher_temp, 3), np.ones(6 - 3) * a.teacher_temp))
    close(list(temp), list(official_temp))


def test_mcl_cosine_over_all_iterations_times_the_warmup_ramp():
    a = mcl.get_args(["--epochs", "6", "--warmup-epochs", "2", "--batch-size", "256", "--min-lr", "0.01"])
    close(mcl.lr_schedule(a, SPE), mcl_official(a.scaled_lr, 0.01, 6, 2, a.warmup_ratio, SPE))
