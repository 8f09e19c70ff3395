"""The dependency-light base layer of cellcurate: what every other package shares.

Nothing here imports torch, timm, zarr, pandas or shapely at module import; the few functions
that need one import it inside. Every package may import ``core``; ``core`` imports only
:mod:`cellcurate.errors` and the standard library (and numpy).

Modules
-------
``atomic``     atomic file and directory writes (temp + fsync + rename + directory fsync), and a
               tree removal that works on Python 3.11 and on frozen (read-only) trees
``weights``    safe weight loading (``torch.load(weights_only=True)`` or safetensors), strict
               state-dict loading into a model, file digests
``encoders``   the one encoder registry (:data:`~cellcurate.core.encoders.ENCODERS`) used by
               relabel features and by the models; building a timm encoder on the meta device
``constants``  the ignore value of class maps and class counts derived from a taxonomy
``geometry``   the one polygon convention (pixel-edge tracing, QuPath's) for a nucleus mask
"""
