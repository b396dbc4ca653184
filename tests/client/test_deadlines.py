"""Deadlines for a chain pass come from measured passes: prompt ones from the median, patient ones from the worst."""

import pytest

from dsdnode.client.deadlines import DeadlineSettings, PassDeadline


def test_first_pass_gets_the_generous_fixed_deadline():
    d = PassDeadline(DeadlineSettings(first_s=60.0))
    assert d.seconds(5) == d.patient_seconds(5) == 60.0


def test_deadlines_follow_measured_passes_and_scale_only_up_with_positions():
    d = PassDeadline(DeadlineSettings(slack=3.0, margin_s=1.0, max_s=120.0))
    for elapsed in (0.2, 0.2, 0.3, 2.0):  # one slow outlier
        d.observe(5, elapsed)
    assert d.seconds(5) == pytest.approx(3 * 0.25 + 1)  # the median of recent passes
    assert d.patient_seconds(5) == pytest.approx(3 * 2.0 + 1)  # the slowest
    assert d.seconds(1) == d.seconds(5)  # fewer positions are not assumed cheaper
    assert d.seconds(50) == pytest.approx(3 * 2.5 + 1)  # ten times the positions of every measured pass
    d.observe(5, 1000.0)
    assert d.patient_seconds(5) == 120.0  # capped


def test_the_window_forgets_old_passes():
    d = PassDeadline(DeadlineSettings(window=2))
    for elapsed in (9.0, 0.1, 0.1):
        d.observe(1, elapsed)
    assert d.patient_seconds(1) == pytest.approx(3 * 0.1 + 1)


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError):
        DeadlineSettings(slack=0.5)
