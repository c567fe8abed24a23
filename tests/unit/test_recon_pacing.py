"""Reconciliation's row budget: reads charged after the fact, waits that keep the average."""

from __future__ import annotations

import pytest

from cdc_recon.pacing import RowBudget


def test_reads_within_the_budget_do_not_wait() -> None:
    """A full bucket pays for a second's worth of rows at once, and the rows it refills each
    second after that."""
    budget = RowBudget(1000)
    assert budget.charge(600, now=10.0) == 0
    assert budget.charge(400, now=10.0) == 0
    assert budget.charge(500, now=10.5) == 0


def test_an_overdraft_waits_until_it_is_paid_back() -> None:
    """A read past the budget waits for the rows it overdrew, at the budget's rate; the next
    read waits for the debt left at its time."""
    budget = RowBudget(1000)
    assert budget.charge(3000, now=0.0) == pytest.approx(2.0)
    assert budget.charge(500, now=1.0) == pytest.approx(1.5)
    assert budget.charge(0, now=2.5) == 0


def test_idle_time_banks_at_most_one_second() -> None:
    """A long pause refills the bucket to one second's worth, not more."""
    budget = RowBudget(1000)
    budget.charge(1000, now=0.0)
    assert budget.charge(2000, now=100.0) == pytest.approx(1.0)


def test_the_average_over_many_reads_is_the_budget() -> None:
    """Pages read back to back, each waiting what it is told, go at the budget's rate."""
    budget, now = RowBudget(5000), 0.0
    for _ in range(100):
        now += budget.charge(5000, now)
    assert now == pytest.approx(99.0)  # 100 pages of a second's worth: the first one is free


def test_a_budget_of_zero_never_waits() -> None:
    """0 rows per second means unpaced."""
    assert RowBudget(0).charge(10**9, now=0.0) == 0
