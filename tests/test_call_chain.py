"""What capturing a helper's frames walks, to find containers shared with the outer loop's scope."""

from __future__ import annotations

import argparse
import sys
import types

from florql.call_chain import _walkable_object, call_chain, capture_chain


class Tracker:  # the script's own class: its attributes may hold containers a helper also holds
    def __init__(self) -> None:
        self.history: list[float] = []


def test_the_scripts_objects_and_namespaces_are_walked_library_objects_are_not():
    assert _walkable_object(Tracker())
    assert _walkable_object(argparse.Namespace(lr=0.1)) and _walkable_object(types.SimpleNamespace(a=1))
    # reaches ~100k objects (actions, formatters, registries): walked at every checkpoint it cost ~0.2 s
    assert not _walkable_object(argparse.ArgumentParser())


def test_a_container_shared_through_the_scripts_object_or_a_namespace_blocks_the_capture():
    def helper(history):
        chain = call_chain(sys._getframe(), outer)  # helper, train: the frames up to the outer loop's
        return capture_chain(chain, outer, {}, set())

    def train(tracker, args):
        losses = tracker.history  # the very list the outer scope's tracker holds
        flags = args.flags
        return helper(None)

    def loop_body():
        nonlocal outer
        outer = sys._getframe()
        parser = argparse.ArgumentParser()
        tracker, args = Tracker(), argparse.Namespace(flags=[1])
        return train(tracker, args)

    outer: types.FrameType | None = None
    captured = loop_body()
    blockers = " ".join(captured["blockers"])
    assert "'losses', which shares a container with 'tracker'" in blockers
    assert "'flags', which shares a container with 'args'" in blockers
