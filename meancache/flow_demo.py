"""Deprecated location of :mod:`meancache.examples.flow_demo` (the analytic-flow demo), kept for one release."""

import warnings

from meancache.examples.flow_demo import *  # noqa: F401,F403

warnings.warn("meancache.flow_demo is deprecated; use meancache.examples.flow_demo", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    from meancache.examples.flow_demo import main

    main()
