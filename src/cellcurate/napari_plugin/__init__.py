"""napari plugin (npe2, manifest ``napari.yaml``): the class and geometry review dock widgets, a reader for store
folders (``napari STORE``) and the synthetic sample as sample data. Needs the ``napari`` extra;
the logic lives in :mod:`cellcurate.curation` and is tested without Qt."""
