"""Documented statements about defaults and guarantees, checked against the code paths they describe (issue 18,
items 12 and 13): when a default changes, the page that states it must change with it. The statements moved from
the README into the guides of the documentation site (issue 21); each test reads the page that states it now."""

from __future__ import annotations

import pathlib
import re

import torch

import meancache
from meancache import Schedule
from meancache.online import OnlinePlan
from meancache.plans import plan_for

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _page(name: str) -> str:
    """A guide's text, whitespace collapsed (a statement may wrap anywhere)."""
    return re.sub(r"\s+", " ", (DOCS / name).read_text(encoding="utf-8"))


ONLINE = _page("online.md")  # online mode
SCHEDULES = _page("schedules.md")  # Schedule, Schedule.default, the estimators
PIPELINES = _page("pipelines.md")  # batches in schedule and online mode
ORDER_WORDS = {1: "1", 2: "2", 3: "3"}


def test_online_mode_estimator_is_the_one_the_docs_name():
    plan = plan_for(50, budget=17, mode="online")
    assert isinstance(plan, OnlinePlan)
    claim = f"(`{plan.estimator}` of order {ORDER_WORDS[plan.order]})"
    assert claim in ONLINE, f"docs/online.md must say {claim}"


def test_default_schedule_estimator_is_the_one_the_docs_name():
    sched = Schedule.default(17, 50)
    multi = [e for e, o in zip(sched.estimators, sched.orders) if o > 0]
    assert set(multi) == {"predict"} and set(o for o in sched.orders if o > 0) == {1}
    assert "(`predict`, order 1;" in SCHEDULES


def test_docs_name_every_estimator_a_schedule_takes():
    from meancache.estimators import ESTIMATORS

    section = SCHEDULES[SCHEDULES.index("## The `Schedule` object"):]
    section = section[: section.index("```")]
    for name in ESTIMATORS:
        assert f'`"{name}"`' in section


def _velocity(x, s):
    # row-wise, so a sample's velocity does not depend on its batch-mates
    return torch.sin(2.5 * x) * (1 + 3 * s) - x * s


def test_a_schedule_gives_each_sample_of_a_batch_what_it_gets_alone():
    sigmas = torch.linspace(1, 0, 31)
    batch = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    for schedule in (Schedule.default(8, 30), Schedule.default(8, 30, "meancache")):
        together = meancache.sample(_velocity, batch, sigmas, schedule)
        alone = torch.cat([meancache.sample(_velocity, row[None], sigmas, schedule) for row in batch])
        torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    assert "give each sample what it gets alone" in PIPELINES


def test_online_mode_decides_from_the_whole_batch_as_the_docs_say():
    def velocity(x, s):
        # a near-constant velocity for small |x|, a fast-turning one for large |x|
        return 1.0 + x.square() * torch.sin(12 * torch.tensor(s))

    sigmas = torch.linspace(1, 0, 31)
    quiet = torch.full((1, 5), 0.05)  # alone: long skipped segments
    wild = torch.full((1, 5), 3.0)  # in the batch it makes the whole batch look unstable: short segments
    schedules = []
    for batch in (quiet, torch.cat([quiet, wild])):
        plan = OnlinePlan(12, 30)
        meancache.sample(velocity, batch, sigmas, plan)
        schedules.append(plan.schedule())
    assert schedules[0].compute_steps != schedules[1].compute_steps
    assert "decided from the velocity change of the whole batch" in PIPELINES
