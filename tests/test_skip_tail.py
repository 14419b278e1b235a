"""What a skip job may leave out (replay/skip_tail.py), on the code alone: every condition that
keeps a statement running. The end-to-end exactness is in tests/test_helper_skip.py."""

from __future__ import annotations

import pytest

from florql.replay.skip_tail import prune_skip_tail

LAYOUT = """
import torch
from torch.utils.data import DataLoader, TensorDataset
import florql


def train(model, loader, optimizer):
    model.train()
    for data, target in florql.loop("step", loader):
        optimizer.step()
    return 1.0


def test(model, loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            correct += model(data).argmax(dim=1).eq(target).sum().item()
    return correct / len(loader.dataset)


test_loader = DataLoader(TensorDataset(x, y), batch_size=32)
with florql.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
    for epoch in florql.loop("epoch", range(4)):
        train_loss = train(model, train_loader, optimizer)
        test_acc = test(model, test_loader)
        florql.log("test_acc", test_acc)
        florql.log("train_loss", train_loss)
        scheduler.step()
"""
ASKED = frozenset({"train_loss"})


def test_the_evaluation_helper_and_the_log_of_its_result_are_left_out_keeping_line_numbers():
    pruned = prune_skip_tail(LAYOUT, ASKED)
    assert pruned is not None
    assert pruned.left_out == ("test_acc = test(model, test_loader)", "florql.log('test_acc', test_acc)")
    assert len(pruned.source.splitlines()) == len(LAYOUT.splitlines())
    assert "test(model, test_loader)" not in pruned.source and "        pass\n        pass\n" in pruned.source


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (
            'florql.log("train_loss", train_loss)',
            'florql.log("train_loss", test_acc)',
            "an asked name reads its result",
        ),
        ("        scheduler.step()\n", "        print(test_acc)\n", "something else reads its result"),
        ("        scheduler.step()\n", "        torch.manual_seed(int(epoch))\n", "unknown code runs after it"),
        ("        scheduler.step()\n", '        florql.log("train_loss", model.training)\n', "a mode is read after it"),
        ("    model.eval()\n", "    model.eval()\n    model.to(torch.float64)\n", "it calls a method of a module"),
        ("    model.eval()\n", "    model.eval()\n    HELD.append(1)\n", "it changes module state"),
        ("    model.eval()\n", "    m = model\n    model.eval()\n", "it aliases a parameter"),
        ("    model.eval()\n", "", "it calls a module it did not put in eval mode"),
        ("    with torch.no_grad():\n", "    if True:\n", "it calls a module with gradients"),
        ("batch_size=32)", "batch_size=32, sampler=sampler)", "its loader has a sampler of its own"),
        ("TensorDataset(x, y)", "MyDataset()", "its loader's data set is the script's own class"),
        ("model=model, ", "", "the module it calls is not registered"),
        (
            "        train_loss = train(",
            '        florql.log("train_loss", 0.0)\n        train_loss = train(',
            "asked first",
        ),
    ],
)
def test_it_runs_when_the_code_does_not_show_that_leaving_it_out_is_exact(old: str, new: str, why: str):
    assert old in LAYOUT
    assert prune_skip_tail(LAYOUT.replace(old, new, 1), ASKED) is None, why


def test_an_asked_name_that_is_the_helpers_result_keeps_it():
    assert prune_skip_tail(LAYOUT, frozenset({"test_acc"})) is None


def test_a_statement_spanning_lines_becomes_pass_and_blank_lines():
    source = LAYOUT.replace(
        "test(model, test_loader)", "test(\n            model,\n            test_loader,\n        )"
    )
    pruned = prune_skip_tail(source, ASKED)
    assert pruned is not None and len(pruned.source.splitlines()) == len(source.splitlines())
    compile(pruned.source, "train.py", "exec")
