"""Deprecated location: the builders live in ``meancache.examples.tiny_pipelines`` (this re-export goes once
the in-flight context-parallel tests import from there)."""

from meancache.examples.tiny_pipelines import *  # noqa: F401,F403
from meancache.examples.tiny_pipelines import NUM_INFERENCE_STEPS, PIPELINES  # noqa: F401
