"""Examples and test fixtures built on meancache; not part of the core library (``import meancache`` never
imports this package). Needs the ``examples`` extra (diffusers, safetensors, scikit-learn, matplotlib, numpy).
"""
