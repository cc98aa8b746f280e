"""Build script for meancache.

Pure-Python for now: the package, its preset schedules, nothing compiled. Install from a checkout with
``pip install --no-build-isolation -e .`` so that the build reuses the installed torch.
"""

from setuptools import setup

setup()
