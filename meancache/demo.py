"""Deprecated location of :mod:`meancache.examples.demo` (make demo), kept for one release."""

import warnings

from meancache.examples.demo import *  # noqa: F401,F403

warnings.warn("meancache.demo is deprecated; use meancache.examples.demo", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    from meancache.examples.demo import main

    main()
