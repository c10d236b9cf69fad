import math

import pytest

from batchsize_study.batch import plan_batch
from batchsize_study.errors import ConfigError
from batchsize_study.schedule import lr_at, lr_multiplier


def test_accumulation_is_derived_from_devices():
    p = plan_batch(64, 8, 2, seq_len=128, max_steps=10)
    assert p.accumulate_grad_batches == 4
    assert p.world_size * p.micro_batch_size * p.accumulate_grad_batches == 64
    assert p.tokens_per_step == 64 * 128 and p.total_tokens == 64 * 128 * 10


def test_impossible_split_names_both_numbers():
    with pytest.raises(ConfigError) as e:
        plan_batch(10, 4, 1, seq_len=8, max_steps=1)
    msg = str(e.value)
    assert "batch_size=10" in msg and "micro_batch_size=4" in msg and "\n" not in msg


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_warmup_rises_monotonically_to_peak(shape):
    kw = dict(warmup_steps=50, max_steps=200, warmup_shape=shape, min_lr_ratio=0.1)
    vals = [lr_multiplier(s, **kw) for s in range(50)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(1.0)
    assert 0 < vals[0] < 0.1


def test_cosine_decay_reaches_floor_and_stays():
    kw = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)
    assert lr_at(60, 2.0, **kw) == pytest.approx(2 * 0.55)


def test_whole_run_warmup_ends_at_peak_and_constant_holds():
    kw = dict(warmup_steps=100, max_steps=100, decay="constant")
    assert lr_multiplier(99, **kw) == pytest.approx(1.0)
    assert lr_multiplier(49, **kw) == pytest.approx(0.5)
    assert not math.isnan(lr_multiplier(100, **kw))


def test_schedule_settings_validate_where_defined():
    from batchsize_study.config import ScheduleConfig

    with pytest.raises(ConfigError, match="schedule.warmup_shape='exp'"):
        ScheduleConfig(warmup_shape="exp")
    with pytest.raises(ConfigError, match="schedule.min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=1.5)


def test_exponential_warmup_spends_equal_steps_per_decade():
    # The superconvergence ramp (Smith 2017's LR range test): 1e-3 -> 1 over 300 steps.
    kw = dict(warmup_steps=300, max_steps=300, warmup_shape="exponential", decay="constant")
    assert lr_multiplier(99, **kw) == pytest.approx(1e-2)
    assert lr_multiplier(199, **kw) == pytest.approx(1e-1)
    assert lr_multiplier(299, **kw) == pytest.approx(1.0)
