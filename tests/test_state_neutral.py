"""Which propagated hindsight statements leave the training state alone (replay/state_neutral.py)."""

from __future__ import annotations

import pytest

from florql.replay.state_neutral import inserted_code_keeps_state

RECORDED = """import florql
import torch

for epoch in florql.loop("epoch", range(3)):
    for x in florql.loop("step", data):
        loss = step(x)
    florql.log("loss", loss)
"""


def patched(statement: str) -> str:
    return RECORDED.replace('    florql.log("loss", loss)\n', f'    florql.log("loss", loss)\n{statement}\n')


@pytest.mark.parametrize(
    "statement",
    [
        '    florql.log("w", float(net[0].weight.detach().norm()))',
        '    florql.log("g", float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))))',
        '    florql.log("n", float(torch.linalg.vector_norm(net.fc.weight)))',
        '    with torch.no_grad():\n        florql.log("acc", (logits.argmax(1) == y).float().mean().item())',
        '    if epoch % 2 == 0:\n        florql.log("m", max(abs(v) for v in values))',
        '    total = sum(len(b) for b in batches)\n    florql.log("total", total)',
    ],
)
def test_reading_statements_keep_state(statement: str):
    assert inserted_code_keeps_state(RECORDED, patched(statement))


@pytest.mark.parametrize(
    "statement",
    [
        '    florql.log("r", float(torch.rand(1)))',  # draws from the RNG
        '    florql.log("w", float(net.weight.add_(1).sum()))',  # in place
        '    florql.log("h", helper(net))',  # unknown: may do anything
        '    florql.log("a", float(net(x).mean()))',  # a forward pass updates BatchNorm statistics
        '    net.scale = 2\n    florql.log("s", net.scale)',  # assigns an attribute
        '    with open("x") as f:\n        florql.log("f", f.read())',
        '    florql.log("n", (n := n + 1))',
        '    florql.log("x", float(np.random.rand()))',
    ],
)
def test_statements_that_may_change_state(statement: str):
    assert not inserted_code_keeps_state(RECORDED, patched(statement))


def test_nothing_inserted_keeps_state():
    assert inserted_code_keeps_state(RECORDED, RECORDED)
