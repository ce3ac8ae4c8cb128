"""The measuring instrument of benchmarks/train_step.py: its FLOP count and its profile grouping,
on hand-computed values."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from train_step_inputs import padded_flops, step_flops          # noqa: E402
from train_step_profile import group_profile                    # noqa: E402

CONFIG = {"num_hidden_layers": 2, "hidden_size": 4}


def test_step_flops_counts_real_tokens_only():
    # texts of 1 and 2 tokens, N = 10: 6 * 10 * (1 + 2) + 12 * 2 * 4 * (1 + 4) = 180 + 480
    assert step_flops(CONFIG, 10, [1, 2]) == 660


def test_padded_flops_pads_each_list_to_its_longest():
    # queries [1, 2] -> [2, 2]: 6*10*4 + 96*8 = 1008; candidates [3] -> [3]: 6*10*3 + 96*9 = 1044
    assert padded_flops(CONFIG, 10, [1, 2], [3]) == 1008 + 1044


class FakeStats:
    """pstats.Stats' `stats` mapping: func -> (primitive calls, calls, own time, cumulative, callers)."""

    def __init__(self, entries):
        self.stats = entries


PKG = os.path.abspath(os.path.join(os.sep, "fake", "minihbt"))
LINEAR = (os.path.join(PKG, "layers.py"), 10, "linear_forward")
GELU = (os.path.join(PKG, "layers.py"), 20, "gelu_forward")
ERF = (os.path.join(PKG, "backend.py"), 7, "erf")                       # names no group: inherits
HELPER = ("~", 0, "<built-in method helper>")                           # called from LINEAR and GELU
FORWARD = (os.path.join(PKG, "model.py"), 5, "forward")                  # names no group, no caller: other
OUTSIDE = (os.path.join(os.sep, "site", "numpy", "linalg.py"), 1, "linear_thing")   # not minihbt: by caller


def edge(ct):
    return (1, 1, ct, ct)


def profile_of(entries):
    return group_profile(FakeStats(entries), os.path.join(PKG, "__init__.py"))


def test_groups_follow_names_and_split_helpers_by_caller_time():
    result = profile_of({
        LINEAR: (1, 1, 2.0, 3.0, {FORWARD: edge(3.0)}),
        GELU: (1, 1, 1.0, 4.0, {FORWARD: edge(4.0)}),
        ERF: (1, 1, 1.0, 1.0, {GELU: edge(1.0)}),
        HELPER: (2, 2, 3.0, 3.0, {LINEAR: edge(1.0), GELU: edge(2.0)}),
        FORWARD: (1, 1, 0.5, 7.5, {}),
        OUTSIDE: (1, 1, 0.25, 0.25, {GELU: edge(0.25)}),
    })
    groups = result["groups"]
    assert groups["linear"] == pytest.approx(2.0 + 1.0)                # own + 1/3 of the helper
    assert groups["GELU"] == pytest.approx(1.0 + 1.0 + 2.0 + 0.25)     # own + erf + 2/3 helper + outside
    assert groups["other"] == pytest.approx(0.5)
    assert result["total_seconds"] == pytest.approx(7.75)
    assert sum(v for k, v in groups.items() if k not in ("linear", "GELU", "other")) == 0.0
    assert result["top"][0] == {"function": "<built-in method helper>", "own_seconds": 3.0, "calls": 2,
                                "group": "GELU"}


def test_softmax_inside_attention_is_softmax_and_rowgrad_file_is_optimizer():
    attention = (os.path.join(PKG, "layers.py"), 30, "attention_forward")
    softmax = (os.path.join(PKG, "kernels.py"), 40, "masked_softmax")
    step = (os.path.join(PKG, "rowgrad.py"), 50, "step")
    result = profile_of({attention: (1, 1, 1.0, 3.0, {}), softmax: (1, 1, 2.0, 2.0, {attention: edge(2.0)}),
                         step: (1, 1, 4.0, 4.0, {})})
    assert result["groups"]["attention"] == 1.0
    assert result["groups"]["softmax"] == 2.0
    assert result["groups"]["optimizer"] == 4.0


def test_a_call_cycle_of_unnamed_functions_ends_in_other():
    a, b = ("~", 0, "a"), ("~", 0, "b")
    result = profile_of({a: (1, 1, 1.0, 2.0, {b: edge(1.0)}), b: (1, 1, 1.0, 2.0, {a: edge(1.0)})})
    assert result["groups"]["other"] == pytest.approx(2.0)


def test_file_rules_and_pool_names():
    streams = (os.path.join(PKG, "dropout.py"), 60, "site_keys")                 # any function of dropout.py
    pool = (os.path.join(PKG, "encoder.py"), 70, "pool_forward")
    result = profile_of({streams: (1, 1, 1.5, 1.5, {}), pool: (1, 1, 0.5, 0.5, {})})
    assert result["groups"]["dropout"] == 1.5
    assert result["groups"]["loss"] == 0.5
