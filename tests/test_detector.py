"""The destabilisation detector on synthetic loss series (pure: no training)."""

import math
import random

import pytest

from batchsize_study.spike import InstabilityDetector


def feed(det, losses, lrs=None):
    for i, loss in enumerate(losses):
        step = i + 1
        v = det.update(step, lrs[i] if lrs else step * 1e-4, loss)
        if v.destabilised:
            return v
    return None


def decay(n, noise=0.03, seed=0, start=8.0, floor=4.0):
    rng = random.Random(seed)
    return [
        floor + (start - floor) * math.exp(-i / 60) + rng.gauss(0, noise * floor) for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_decay_plus_noise_never_fires(seed):
    assert feed(InstabilityDetector(), decay(600, noise=0.03, seed=seed)) is None


def test_flat_noisy_plateau_never_fires():
    rng = random.Random(1)
    assert feed(InstabilityDetector(), [5.0 + rng.gauss(0, 0.15) for _ in range(800)]) is None


def test_sudden_jump_onset_within_a_few_steps():
    k = 300
    series = decay(k, noise=0.02) + [7.5 + random.Random(2).gauss(0, 0.1) for _ in range(100)]
    v = feed(InstabilityDetector(), series)
    assert v is not None
    assert abs(v.onset_step - k) <= 3, v
    assert v.alarm_step > v.onset_step


def test_nan_fires_at_once():
    series = decay(100) + [float("nan")]
    v = feed(InstabilityDetector(), series)
    assert v is not None and v.alarm_step == 101 and "non-finite" in v.reason
    v = feed(InstabilityDetector(), [float("inf")])
    assert v is not None and v.alarm_step == 1


def test_plateau_fifteen_percent_above_best_is_detected():
    rng = random.Random(3)
    best = 4.0
    falling = [6.0 - 2.0 * i / 200 + rng.gauss(0, 0.05) for i in range(200)]
    rise = [best * (1 + 0.15 * j / 20) + rng.gauss(0, 0.05) for j in range(20)]
    plateau = [best * 1.15 + rng.gauss(0, 0.05) for _ in range(100)]
    v = feed(InstabilityDetector(), falling + rise + plateau)
    assert v is not None
    assert 195 <= v.onset_step <= 212, v


def test_reported_lr_is_the_onsets_not_the_alarms():
    k = 250
    lrs = [1e-4 * (i + 1) for i in range(400)]
    series = decay(k, noise=0.01) + [4.0 * (1 + 0.02 * j) for j in range(150)]  # steady climb
    v = feed(InstabilityDetector(), series, lrs)
    assert v is not None
    assert v.onset_lr == pytest.approx(lrs[v.onset_step - 1])
    assert v.alarm_step - v.onset_step >= 5
    assert v.onset_lr < lrs[v.alarm_step - 1]
    assert abs(v.onset_step - k) <= 4


def test_first_steps_are_ignored():
    # A bump in the first steps (loss still near ln V) must not set the best or fire.
    series = [8.0, 8.5, 9.0, 9.5, 9.9] * 4 + decay(200, noise=0.01)
    assert feed(InstabilityDetector(ignore_first=20), series) is None


def test_verdict_is_sticky():
    det = InstabilityDetector()
    feed(det, [float("nan")])
    assert det.update(5, 0.1, 1.0).destabilised
