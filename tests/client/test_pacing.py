"""Slow-walking: a hop whose passes grow is named after a few passes, honest jitter never is, and a
delay before a hop received the block is blamed upstream once (fast, no network)."""

from __future__ import annotations

import random

from dsdnode.client.pacing import BASELINE_PASSES, PaceWatch, came_late


def test_a_hop_that_doubles_its_delay_each_block_is_replaced_within_a_few_passes():
    watch = PaceWatch()
    watch.reset(["a", "b"])
    delay, named_at = 0.34, None
    for i in range(30):
        slow = watch.observe(["a", "b"], [0.03, delay], [0.03, delay], 4, [None, None])
        if slow:
            assert slow == {"b": "slow_walking"}
            named_at = i
            break
        delay *= 2
    # the baseline passes, then two passes over 5x the baseline + 1 s: named within a few blocks
    assert named_at is not None and named_at <= BASELINE_PASSES + 5


def test_honest_jitter_and_long_blocks_are_not_slow_walking():
    rng = random.Random(0)
    watch = PaceWatch()
    watch.reset(["a"])
    for _ in range(500):
        share = 0.05 * rng.uniform(0.5, 3.0)  # a loaded machine: up to 3x its median, now and then
        assert not watch.observe(["a"], [share], [share], rng.randint(1, 8), [None])
    assert not watch.observe(["a"], [30.0], [30.0], 64, [None])  # a replay block costs more for honest reasons


def test_a_replica_measured_far_cheaper_sets_the_limit():
    watch = PaceWatch()
    watch.reset(["a"])
    for _ in range(BASELINE_PASSES):  # a hop slow from its first pass: its own baseline says nothing
        watch.observe(["a"], [2.0], [2.0], 4, [0.05])
    assert [watch.observe(["a"], [2.0], [2.0], 4, [0.05]) for _ in range(2)] == [{}, {"a": "slow_walking"}]


def test_a_late_push_is_blamed_upstream_once_then_on_the_hop_whose_stamps_say_so():
    watch = PaceWatch()
    watch.reset(["a", "b"])
    for _ in range(BASELINE_PASSES):
        watch.observe(["a", "b"], [0.03, 0.03], [0.03, 0.03], 4, [None, None])
    late = [watch.observe(["a", "b"], [0.03, 3.0], [0.03, 0.03], 4, [None, None]) for _ in range(2)]
    assert late[-1] == {"a": "pushed late to its next hop"}  # b's stamps: it got the block late
    again = [watch.observe(["c", "b"], [0.03, 3.0], [0.03, 0.03], 4, [None, None]) for _ in range(2)]
    assert again[-1] == {"b": "slow_walking"}  # b blames every predecessor: its own stamps are not believed


def test_a_share_spent_before_the_hop_received_the_block_is_not_its_speed():
    """Its stamps account for the share (noise within 0.25 s, or within what they account for): its
    own; most of it before the hop says it got the block: not measured as its speed."""
    assert not came_late(0.30, 0.28) and not came_late(0.2, 0.0) and not came_late(1.0, 0.6)
    assert came_late(0.45, 0.05) and came_late(3.2, 0.1)
