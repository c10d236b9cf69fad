"""The destabilisation detector on synthetic loss series (pure: no training)."""

import math
import random

import pytest

from batchsize_study.detector import DestabilisationDetector


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
    assert feed(DestabilisationDetector(), decay(600, noise=0.03, seed=seed)) is None


def test_flat_noisy_plateau_never_fires():
    rng = random.Random(1)
    assert feed(DestabilisationDetector(), [5.0 + rng.gauss(0, 0.15) for _ in range(800)]) is None


def test_sudden_jump_onset_within_a_few_steps():
    k = 300
    series = decay(k, noise=0.02) + [7.5 + random.Random(2).gauss(0, 0.1) for _ in range(100)]
    v = feed(DestabilisationDetector(), series)
    assert v is not None
    assert abs(v.onset_step - k) <= 3, v
    assert v.alarm_step > v.onset_step


def test_nan_fires_at_once():
    series = decay(100) + [float("nan")]
    v = feed(DestabilisationDetector(), series)
    assert v is not None and v.alarm_step == 101 and "non-finite" in v.reason
    v = feed(DestabilisationDetector(), [float("inf")])
    assert v is not None and v.alarm_step == 1


def test_plateau_fifteen_percent_above_best_is_detected():
    rng = random.Random(3)
    best = 4.0
    falling = [6.0 - 2.0 * i / 200 + rng.gauss(0, 0.05) for i in range(200)]
    rise = [best * (1 + 0.15 * j / 20) + rng.gauss(0, 0.05) for j in range(20)]
    plateau = [best * 1.15 + rng.gauss(0, 0.05) for _ in range(100)]
    v = feed(DestabilisationDetector(), falling + rise + plateau)
    assert v is not None
    assert 195 <= v.onset_step <= 212, v


def test_reported_lr_is_the_onsets_not_the_alarms():
    k = 250
    lrs = [1e-4 * (i + 1) for i in range(400)]
    series = decay(k, noise=0.01) + [4.0 * (1 + 0.02 * j) for j in range(150)]  # steady climb
    v = feed(DestabilisationDetector(), series, lrs)
    assert v is not None
    assert v.onset_lr == pytest.approx(lrs[v.onset_step - 1])
    assert v.alarm_step - v.onset_step >= 5
    assert v.onset_lr < lrs[v.alarm_step - 1]
    assert abs(v.onset_step - k) <= 4


def test_first_steps_are_ignored():
    # A bump in the first steps (loss still near ln V) must not set the best or fire.
    series = [8.0, 8.5, 9.0, 9.5, 9.9] * 4 + decay(200, noise=0.01)
    assert feed(DestabilisationDetector(ignore_first=20), series) is None


def test_verdict_is_sticky():
    det = DestabilisationDetector()
    feed(det, [float("nan")])
    assert det.update(5, 0.1, 1.0).destabilised


# ---------------------------------------------------------------- onset definitions


def v_shape(turn=200, n=400, fall=0.004, climb=0.001, noise=0.0, seed=0):
    """Falls linearly to step ``turn``, then climbs slowly: where a higher LR stops helping."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        base = 6.0 - fall * min(i, turn) + climb * max(0, i - turn) * 6.0
        out.append(base + rng.gauss(0, noise))
    return out


def test_min_loss_onset_is_where_the_loss_stopped_improving_not_where_it_rose():
    # Falls to step 150, drifts up 0.6 % over 100 steps (inside the 1 % tolerance), then jumps.
    lo = 6.0 - 0.01 * 150
    series = [6.0 - 0.01 * i for i in range(1, 151)]
    series += [lo * (1 + 0.006 * j / 100) for j in range(1, 101)]
    series += [lo * 1.2] * 40
    rise = feed(DestabilisationDetector(onset="rise"), series)
    minimum = feed(DestabilisationDetector(onset="min_loss"), series)
    assert rise is not None and minimum is not None
    assert rise.alarm_step == minimum.alarm_step  # the alarm rule is the same
    assert 245 <= rise.onset_step <= 255, rise
    # The smoothed loss keeps closing on the plateau for a few EMA time constants after the raw
    # loss stopped falling, so its minimum trails the kink at 150 by ~30 steps; still far before
    # the rise the seed's reading waits for.
    assert 150 <= minimum.onset_step <= 190, minimum
    assert minimum.definition == "min_loss" and rise.definition == "rise"
    assert "onset by min_loss" in minimum.reason


def test_slow_rise_min_loss_and_its_lag_correction():
    series = v_shape(turn=200)
    plain = feed(DestabilisationDetector(onset="min_loss"), series)
    lagged = feed(DestabilisationDetector(onset="min_loss", lag_correction=True), series)
    seed_literal = feed(DestabilisationDetector(), series)
    assert plain is not None and lagged is not None and seed_literal is not None
    assert 200 < plain.onset_step <= 206  # at a sharp turn the smoothed minimum trails a little
    assert lagged.onset_step == plain.onset_step - 9  # 0.9 / (1 - 0.9) steps back
    assert lagged.onset_lr == pytest.approx(lagged.onset_step * 1e-4)  # the lagged step's lr
    assert lagged.definition == "min_loss+lag"
    assert seed_literal.onset_step > plain.onset_step  # the 1 % rule waits for the climb


def test_min_loss_nan_reports_the_best_step_and_noise_does_not_fire():
    series = v_shape(turn=10_000, n=300) + [float("nan")]  # still falling when it blows up
    v = feed(DestabilisationDetector(onset="min_loss"), series)
    assert v is not None and v.alarm_step == 301 and "non-finite" in v.reason
    assert 295 <= v.onset_step <= 300
    falling_then_nan = v_shape(turn=100, n=150) + [float("nan")]
    v = feed(DestabilisationDetector(onset="min_loss"), falling_then_nan)
    assert v is not None and 100 <= v.onset_step <= 112  # the minimum, not the NaN step
    for seed in range(3):
        assert feed(DestabilisationDetector(onset="min_loss"), decay(600, seed=seed)) is None


def test_replay_matches_feeding_and_reports_the_smoothed_curve():
    from batchsize_study.config import DetectorConfig
    from batchsize_study.detector import replay

    series = v_shape(turn=200, noise=0.02)
    rows = [(i + 1, (i + 1) * 1e-4, loss) for i, loss in enumerate(series)]
    cfg = DetectorConfig(onset="min_loss", lag_correction=True)
    v, smoothed = replay(rows, cfg)
    assert v == feed(DestabilisationDetector.from_config(cfg), series)
    assert len(smoothed) == v.alarm_step and smoothed[0] == pytest.approx(series[0])


def test_detector_settings_validate_where_defined():
    from batchsize_study.config import DetectorConfig
    from batchsize_study.errors import ConfigError

    with pytest.raises(ConfigError, match="detector.onset='dip'"):
        DetectorConfig(onset="dip")
    with pytest.raises(ConfigError, match="detector.smoothing"):
        DetectorConfig(smoothing=1.0)


def test_plateau_onset_is_where_the_loss_reached_its_plateau():
    # Falls to step 150, drifts up 0.6 % over 100 steps, then jumps: the seed's rule reads the end
    # of the plateau (~250), min_loss its lowest smoothed point, plateau its start (~150).
    lo = 6.0 - 0.01 * 150
    series = [6.0 - 0.01 * i for i in range(1, 151)]
    series += [lo * (1 + 0.006 * j / 100) for j in range(1, 101)]
    series += [lo * 1.2] * 40
    plateau = feed(DestabilisationDetector(onset="plateau"), series)
    lagged = feed(DestabilisationDetector(onset="plateau", lag_correction=True), series)
    minimum = feed(DestabilisationDetector(onset="min_loss"), series)
    assert plateau is not None and lagged is not None and minimum is not None
    assert plateau.alarm_step == minimum.alarm_step
    assert 145 <= plateau.onset_step <= 160 < minimum.onset_step, (plateau, minimum)
    assert 140 <= lagged.onset_step <= 152 and lagged.definition == "plateau+lag"
    # A new best later in the run moves the plateau's start to the new band.
    again = series[:250] + [lo * (1 - 0.04 * j / 20) for j in range(1, 21)] + [lo * 1.3] * 40
    later = feed(DestabilisationDetector(onset="plateau"), again)
    assert later is not None and later.onset_step > 250, later


def test_plateau_onset_on_nan_and_noise():
    v = feed(DestabilisationDetector(onset="plateau"), v_shape(turn=100, n=150) + [float("nan")])
    assert v is not None and v.alarm_step == 151 and v.onset_step <= 110
    for seed in range(3):
        assert feed(DestabilisationDetector(onset="plateau"), decay(600, seed=seed)) is None


# ---------------------------------------------------------------- non-finite loss: the onset


@pytest.mark.parametrize("lag", [False, True])
def test_rise_onset_on_nan_is_the_last_finite_step_lagged_if_asked(lag):
    # Still falling when the loss turns NaN at step 301: under rise the onset is the last finite
    # step (300), not the NaN step; "+lag" moves it back 9 steps as on the finite path.
    for bad in (float("nan"), float("inf")):
        v = feed(DestabilisationDetector(lag_correction=lag), v_shape(turn=10_000, n=300) + [bad])
        assert v is not None and v.alarm_step == 301 and "non-finite" in v.reason
        want = 300 - 9 if lag else 300
        assert (v.onset_step, v.onset_lr) == (want, pytest.approx(want * 1e-4)), v
        assert v.definition == ("rise+lag" if lag else "rise")


@pytest.mark.parametrize("onset", ["rise", "min_loss", "plateau"])
def test_nan_onset_follows_the_finite_rule_and_its_lag_for_every_onset(onset):
    # A rise that has begun (not yet for `patience` steps) and then NaN: the onset is the one the
    # finite alarm names when the rise continues instead, and the lag moves it back 9 steps.
    start = v_shape(turn=200, n=200) + [5.2 * 1.2] * 4
    nan = start + [float("nan")]
    held = start + [5.2 * 1.2] * 40
    for lag in (False, True):
        got = feed(DestabilisationDetector(onset=onset, lag_correction=lag), nan)
        want = feed(DestabilisationDetector(onset=onset, lag_correction=lag), held)
        assert got is not None and want is not None and got.alarm_step == 205
        assert (got.onset_step, got.onset_lr) == (want.onset_step, want.onset_lr), (got, want)
    # NaN while still falling: rise names the last finite step, min_loss (the best) too here.
    falling = v_shape(turn=10_000, n=150) + [float("nan")]
    plain = feed(DestabilisationDetector(onset=onset), falling)
    lagged = feed(DestabilisationDetector(onset=onset, lag_correction=True), falling)
    assert plain is not None and lagged is not None
    assert lagged.onset_step == plain.onset_step - 9
    assert lagged.onset_lr == pytest.approx(lagged.onset_step * 1e-4)
    if onset != "plateau":
        assert plain.onset_step == 150


@pytest.mark.parametrize("onset", ["rise", "min_loss", "plateau"])
def test_nan_within_ignore_first_reads_the_last_finite_step(onset):
    # No best yet (ignore_first): the last finite step, lagged if asked (as far back as it goes).
    series = [8.0 - 0.01 * i for i in range(15)] + [float("nan")]
    plain = feed(DestabilisationDetector(onset=onset), series)
    lagged = feed(DestabilisationDetector(onset=onset, lag_correction=True), series)
    assert plain is not None and (plain.onset_step, plain.alarm_step) == (15, 16)
    assert plain.onset_lr == pytest.approx(15e-4)
    assert lagged is not None and lagged.onset_step == 15 - 9
    assert lagged.onset_lr == pytest.approx(6e-4)
    # Nothing finite at all: the only step there is.
    first = feed(DestabilisationDetector(onset=onset, lag_correction=True), [float("inf")])
    assert first is not None and (first.onset_step, first.alarm_step) == (1, 1)


@pytest.mark.parametrize("onset", ["rise", "min_loss", "plateau"])
def test_replay_of_a_nan_run_matches_feeding(onset):
    from batchsize_study.config import DetectorConfig
    from batchsize_study.detector import replay

    series = v_shape(turn=10_000, n=120, noise=0.01) + [float("nan"), 3.0]
    rows = [(i + 1, (i + 1) * 1e-4, loss) for i, loss in enumerate(series)]
    for lag in (False, True):
        cfg = DetectorConfig(onset=onset, lag_correction=lag)
        v, smoothed = replay(rows, cfg)
        assert v == feed(DestabilisationDetector.from_config(cfg), series)
        assert v.alarm_step == 121 and v.onset_step <= 120 and len(smoothed) == 121
        if onset == "rise":
            assert v.onset_step == (120 - 9 if lag else 120)
