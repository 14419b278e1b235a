"""Plain state of the outer loop's scope is captured and restored (module globals and function locals)."""

import random
import sys

import torch

from florql.scope import baseline_of, capture_scope, restore_scope


class EarlyStopping:
    def __init__(self) -> None:
        self.best = float("inf")
        self.bad_epochs = 0


def test_function_locals_objects_and_generators_are_restored():
    def training():
        frame = sys._getframe()
        lr, best, history = 0.1, float("inf"), [1.0]
        stopper = EarlyStopping()
        gen = torch.Generator().manual_seed(3)
        weights = torch.zeros(3)
        baseline = baseline_of(frame)
        lr /= 4.0
        best = 0.5
        history.append(2.0)
        stopper.best, stopper.bad_epochs = 0.25, 2
        weights.add_(1.0)
        expected_draw = torch.rand(2, generator=torch.Generator().manual_seed(0))
        del expected_draw
        captured = capture_scope(frame, set(), set(), baseline)
        next_draw = torch.rand(2, generator=gen)
        lr, best, history = 9.0, 9.0, []
        stopper.best, stopper.bad_epochs = 9.0, 9
        weights.add_(5.0)
        restore_scope(frame, captured)
        return lr, best, history, stopper, weights, torch.rand(2, generator=gen), next_draw

    lr, best, history, stopper, weights, draw_after_restore, draw_at_capture = training()
    assert (lr, best, history) == (0.025, 0.5, [1.0, 2.0])
    assert (stopper.best, stopper.bad_epochs) == (0.25, 2)
    assert torch.equal(weights, torch.ones(3))
    assert torch.equal(draw_after_restore, draw_at_capture)


def test_unchanged_immutable_values_are_not_copied():
    frame = sys._getframe()
    data = torch.arange(10.0)
    seed = random.random()
    baseline = baseline_of(frame)
    captured = capture_scope(frame, set(), set(), baseline)
    assert "data" not in captured["plain"] and "seed" not in captured["plain"]
