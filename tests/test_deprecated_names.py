"""Renamed stats fields keep working for one release, with a DeprecationWarning; the example shims are gone."""

from __future__ import annotations

import subprocess
import sys

import pytest

import meancache

#: Example modules that once had shims at the package top level. No release shipped the shims, so they are gone:
#: the top level shows the library alone (issue 18).
REMOVED = ["meancache.digits", "meancache.flow_demo", "meancache.image_metrics", "meancache.demo",
           "meancache.peer_caches", "meancache.pipeline_recording"]


@pytest.mark.parametrize("old", REMOVED)
def test_example_shims_are_gone_from_the_top_level(old):
    code = f"import importlib; importlib.import_module({old!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stderr[-2000:]


def test_renamed_stats_fields_warn_and_read_the_new_ones():
    s = meancache.Stats(model_calls=3, calls_saved=5)
    for old, value in (("transformer_calls", 3), ("transformer_calls_saved", 5), ("skipped_calls", 5)):
        with pytest.warns(DeprecationWarning, match=f"Stats.{old} is deprecated"):
            assert getattr(s, old) == value
    with pytest.raises(AttributeError):
        s.no_such_field


def test_former_stats_type_names_are_the_one_type():
    from meancache.module import RunStats
    from meancache.pipeline import PipelineSummary

    assert RunStats is PipelineSummary is meancache.Stats
