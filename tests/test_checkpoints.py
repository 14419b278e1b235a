"""Adaptive two-phase checkpoints: when they are taken, what they hold, and that they are never torn."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import florql
from florql.checkpoint_engine import AdaptivePolicy, Stager
from florql.rng import capture_rng, restore_rng
from florql.storage import layout
from florql.storage.checkpoints import CorruptCheckpoint, list_checkpoints, read_checkpoint, write_checkpoint
from florql.storage.runfiles import TMP_PREFIX, LocalRunFiles


class SlowState:
    """A registered object whose snapshot takes `delay` seconds (a large model on a slow host)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.value = torch.zeros(4)

    def state_dict(self) -> dict:
        time.sleep(self.delay)
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])


# ---- policy and staging, as units ----------------------------------------------------------
def test_policy_period_follows_stall_over_budget_times_iteration():
    policy = AdaptivePolicy(budget=0.05)
    iteration, stall = 0.01, 0.02  # a checkpoint costs two iterations: every ~40th fits 5 %
    for _ in range(2000):
        policy.observe(iteration)
        if policy.should_checkpoint(estimated_stall_s=stall, persist_in_flight=False):
            policy.record(stall)
    assert policy.overhead <= 0.05
    assert 38 <= policy.period <= 42
    assert policy.gaps[-5:] == [40] * 5


def test_policy_keeps_checkpointing_after_one_noisy_iteration():
    """One slow iteration during the first persist must not stop checkpointing for the rest of the run."""
    policy = AdaptivePolicy(budget=0.05)
    iteration, stall = 0.03, 0.0005
    overlapped = False
    for index in range(60):
        noisy = overlapped and policy.taken == 1  # the first persist: a 5x slower iteration
        policy.iteration(iteration * 5 if noisy else iteration * 1.02 if overlapped else iteration, overlapped)
        policy.observe(iteration)
        overlapped = policy.should_checkpoint(stall, persist_in_flight=False)
        if overlapped:
            policy.record(stall)
    assert policy.taken >= 40, policy.gaps
    assert policy.gaps[-10:] == [1] * 10  # back to every iteration once the estimate is honest
    assert policy.overhead <= 0.05


def test_policy_charges_a_real_interference():
    """Persists that slow every overlapped iteration by 40 % are charged: checkpoints space out."""
    policy = AdaptivePolicy(budget=0.05)
    overlapped = False
    for _ in range(400):
        policy.iteration(0.014 if overlapped else 0.01, overlapped)
        policy.observe(0.01)
        overlapped = policy.should_checkpoint(0.0001, persist_in_flight=False)
        if overlapped:
            policy.record(0.0001)
    assert policy.overhead <= 0.06
    assert 6 <= policy.period <= 12, policy.gaps[-10:]


def test_policy_never_checkpoints_while_a_persist_is_in_flight():
    policy = AdaptivePolicy(budget=0.5)
    policy.observe(1.0)
    assert not policy.should_checkpoint(0.0, persist_in_flight=True)
    assert policy.skipped_in_flight == 1 and policy.taken == 0
    assert policy.should_checkpoint(0.0, persist_in_flight=False)


def test_stager_reuses_its_buffers_and_snapshots_are_detached():
    net = torch.nn.Linear(3, 2)
    stager = Stager()
    first = stager.stage({"model": net})["model"]["weight"]
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(first, net.weight)  # the snapshot did not follow the live tensor
    second = stager.stage({"model": net})["model"]["weight"]
    assert second.data_ptr() == first.data_ptr()  # same buffer, refreshed in place
    assert torch.equal(second, net.weight)


# ---- files ----------------------------------------------------------------------------------
def test_corrupted_checkpoint_is_detected_by_its_checksum(tmp_path):
    files = LocalRunFiles(tmp_path)
    payload = {"objects": {"model": torch.nn.Linear(8, 8).state_dict()}, "rng": capture_rng()}
    record = write_checkpoint(files, 1, 0, "iter_end", {"epoch": 0}, payload, stall_s=0.001)
    assert list_checkpoints(files, 1) == [record]
    assert torch.equal(
        read_checkpoint(files, record)["objects"]["model"]["weight"], payload["objects"]["model"]["weight"]
    )

    path = files.local_path(layout.checkpoint_data_path(1, record.name))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {record.name} of run 1 is corrupt"):
        read_checkpoint(files, record)
    open(path, "wb").write(bytes(data[:-10]))  # truncated
    with pytest.raises(CorruptCheckpoint):
        read_checkpoint(files, record)


KILL_DURING_PERSIST = """
import time, torch, florql
big = torch.nn.Linear(4096, 4096)  # 64 MiB of state: each persist takes a while
torch.nn.init.zeros_(big.weight)
with florql.checkpointing(budget=0.9, model=big):
    for epoch in florql.loop("epoch", range(100000)):
        time.sleep(0.2)
        with torch.no_grad():
            big.weight.add_(1.0)
"""


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def test_kill_during_a_persist_leaves_no_visible_partial_checkpoint(store):
    proc = store.popen(store.write_script(KILL_DURING_PERSIST))
    folder = store.home / "runs" / "1" / "checkpoints"

    def names() -> list[str]:
        return os.listdir(folder) if folder.exists() else []

    try:
        assert _wait_for(lambda: any(n.endswith(".json") for n in names()), 30), proc.stderr
        assert _wait_for(lambda: any(n.startswith(TMP_PREFIX) for n in names()), 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    left = names()
    assert any(n.startswith(TMP_PREFIX) for n in left)  # the kill did land mid-write
    files = store.files
    records = list_checkpoints(files, 1)
    assert records
    listed = {r.name for r in records}
    for name in left:
        stem, ext = os.path.splitext(name)
        if ext == ".ckpt" and not os.path.exists(folder / f"{stem}.json"):
            assert stem not in listed
    assert not any(p.rsplit("/", 1)[1].startswith(TMP_PREFIX) for p in files.list(layout.checkpoints_dir(1)))
    for record in records:
        weight = read_checkpoint(files, record)["objects"]["model"]["weight"]
        assert torch.all(weight == record.outer_index + 1)  # the state at the end of that iteration
    assert store.sql("SELECT name FROM checkpoints WHERE run_id = 1 ORDER BY name") == sorted((n,) for n in listed)
    assert store.sql("SELECT status FROM runs") == [("killed",)]


# ---- in a session ---------------------------------------------------------------------------
def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One training iteration that draws from Python, NumPy and torch (dropout) RNGs."""
    shift = random.random() + float(np.random.rand())
    out = net(data + shift)
    loss = out.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), out.detach().clone()


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))


def test_rng_and_state_restored_from_a_checkpoint_reproduce_the_next_iterations_bit_exactly(session, store):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    data = torch.randn(16, 8)
    outputs = []
    with florql.checkpointing(budget=0.9, model=net, optimizer=opt):
        for epoch in florql.loop("epoch", range(5)):
            loss, out = _step(net, opt, data)
            florql.log("loss", loss)
            outputs.append((loss, out))
            time.sleep(0.02)
    records = [r for r in list_checkpoints(store.files, session.run_id) if r.outer_index <= 2]
    assert records, "no checkpoint in the first iterations"
    for record in records:
        state = read_checkpoint(store.files, record)
        assert state["position"] == {"outer_index": record.outer_index, "kind": "iter_end"}
        random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble everything first
        replica = _model()
        replica_opt = torch.optim.SGD(replica.parameters(), lr=0.01, momentum=0.9)
        replica.load_state_dict(state["objects"]["model"])
        replica_opt.load_state_dict(state["objects"]["optimizer"])
        restore_rng(state["rng"])
        for index in range(record.outer_index + 1, 5):
            loss, out = _step(replica, replica_opt, data)
            assert loss == outputs[index][0]
            assert torch.equal(out, outputs[index][1])


def test_rng_capture_restore_covers_python_numpy_and_torch():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3), torch.nn.functional.dropout(torch.ones(64), 0.5))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3), torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_cheap_checkpoints_are_taken_every_iteration_and_recorded(session, store):
    net = torch.nn.Linear(16, 16)
    with florql.checkpointing(budget=0.9, model=net):
        for epoch in florql.loop("epoch", range(6)):
            time.sleep(0.03)
            session.persister.wait()  # on a busy machine a persist may outlast an iteration: not this test's point
    policy = session.policy
    assert (policy.taken, policy.considered, policy.skipped_in_flight) == (6, 6, 0)
    session.finish()
    rows = store.sql(
        "SELECT outer_index, kind, coords, bytes, stall_s, persist_s FROM checkpoints ORDER BY outer_index"
    )
    assert [r[:3] for r in rows] == [(i, "iter_end", json.dumps({"epoch": i})) for i in range(6)]
    assert all(r[3] > 16 * 16 * 4 and r[4] >= 0 and r[5] > 0 for r in rows)
    assert store.sql("SELECT checkpoints_taken, checkpoint_budget FROM runs") == [(6, 0.9)]


def test_slow_checkpoints_grow_the_period_and_the_overhead_stays_within_budget(session, store):
    budget = 0.05
    with florql.checkpointing(budget=budget, state=SlowState(delay=0.01)):
        # Long enough for a second checkpoint even when a busy machine stretches the stall 3x.
        for epoch in florql.loop("epoch", range(800)):
            time.sleep(0.002)
    policy = session.policy
    assert 2 <= policy.taken <= 40
    assert policy.period >= 20  # ~ stall / (budget × iteration) = 0.01 / (0.05 × 0.002) = 100
    assert policy.stall_s / policy.train_s <= budget + 0.01
    session.finish()
    manifest = json.loads(store.files.get(layout.manifest_path(session.run_id)))
    assert manifest["checkpoints"]["taken"] == policy.taken
    assert manifest["checkpoints"]["overhead"] == pytest.approx(policy.overhead, abs=1e-5)
    assert manifest["checkpoints"]["overhead"] <= budget + 0.01
    stalls = store.sql("SELECT sum(stall_s), count(*) FROM checkpoints")[0]
    assert stalls[0] == pytest.approx(policy.stall_s, rel=0.05) and stalls[1] == policy.taken


def _inner(n: int) -> None:
    for _ in florql.loop("step", range(n)):
        pass


def test_checkpoint_lands_after_the_inner_loop_when_it_runs_in_the_outer_frame(session, store):
    with florql.checkpointing(budget=0.9, model=torch.nn.Linear(4, 4)):
        for epoch in florql.loop("epoch", range(2)):
            for step in florql.loop("step", range(3)):
                time.sleep(0.01)
            time.sleep(0.01)
    kinds = [(r.outer_index, r.kind) for r in list_checkpoints(store.files, session.run_id)]
    assert kinds == [(0, "inner_end"), (1, "inner_end")]


def test_an_inner_loop_in_a_helper_checkpoints_at_the_end_of_the_iteration(session, store):
    with florql.checkpointing(budget=0.9, model=torch.nn.Linear(4, 4)):
        for epoch in florql.loop("epoch", range(2)):
            _inner(3)
            time.sleep(0.02)
            session.persister.wait()  # not a test of the policy under load
    kinds = [(r.outer_index, r.kind) for r in list_checkpoints(store.files, session.run_id)]
    assert kinds == [(0, "iter_end"), (1, "iter_end")]
