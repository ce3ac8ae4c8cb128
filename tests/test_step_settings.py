"""step.py's schedule and AdamW state: a linear schedule without its end is a ValueError as an
unknown schedule is, and an optimiser's state restores its constants as well as its moments."""
import numpy as np
import pytest

from minihbt import step


def test_the_schedules_refuse_bad_settings_with_a_value_error():
    with pytest.raises(ValueError, match="schedule 'linear' needs total"):
        step.scheduled_lr(3, 1e-3, warmup=2, schedule="linear", total=None)
    with pytest.raises(ValueError, match="schedule must be one of"):
        step.scheduled_lr(3, 1e-3, schedule="cosine")
    assert step.scheduled_lr(0, 1e-3, warmup=2, schedule="linear", total=10) == 0.0     # warm-up: step 0 at lr 0
    assert step.scheduled_lr(0, 1e-3, schedule="linear", total=10) == 1e-3              # none: the full rate


def test_adamw_state_restores_its_constants_and_moments():
    params = {"w": np.ones((2, 3)), "b.bias": np.zeros(3)}
    saved = step.AdamW(params, lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)
    saved.step(params, {"w": np.full((2, 3), 0.5), "b.bias": np.ones(3)})
    other = step.AdamW(params)
    other.load_state_dict(saved.state_dict())
    assert (other.t, other.lr, other.betas, other.eps, other.weight_decay) == (1, 1e-3, (0.8, 0.9), 1e-6, 0.2)
    assert all(np.array_equal(other.m[k], saved.m[k]) and np.array_equal(other.v[k], saved.v[k]) for k in params)
