"""mmedge: on-device image<->text retrieval.

Importing this package is cheap: it pulls in nothing heavy. The runtime lives in
:mod:`mmedge.runtime`; training (``mmedge[train]``) in :mod:`mmedge.train` and
:mod:`mmedge.export`.
"""

__version__ = "0.1.0"
