"""cellcurate: curate PanNuke and MoNuSAC into one versioned 7-class nucleus dataset.

Subpackages (dependencies point downwards only)::

    cli -> (napari_plugin, models, curation, relabel) -> datasets
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellcurate")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
