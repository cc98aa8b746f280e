"""Names that moved in the one-engine restructure keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import meancache

MOVED = [
    ("meancache.digits", "load_pipeline", "meancache.examples.digits"),
    ("meancache.flow_demo", "run_demo", "meancache.examples.flow_demo"),
    ("meancache.image_metrics", "psnr", "meancache.examples.image_metrics"),
    ("meancache.demo", "run_demo", "meancache.examples.demo"),
    ("meancache.peer_caches", "count_evaluations", "meancache.examples.peer_caches"),
    ("meancache.pipeline_recording", "record_pipeline", "meancache.calibration"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[m[0] for m in MOVED])
def test_moved_module_warns_and_gives_the_same_object(old, name, new):
    # a fresh interpreter: the warning is raised once, when the old module is first imported
    code = textwrap.dedent(
        f"""
        import importlib, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module({old!r})
        new = importlib.import_module({new!r})
        assert getattr(old, {name!r}) is getattr(new, {name!r})
        assert any(issubclass(w.category, DeprecationWarning) and {new!r} in str(w.message) for w in caught), caught
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


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
