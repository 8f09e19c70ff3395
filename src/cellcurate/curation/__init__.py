"""Review queue and decisions, versioned export (releases), QuPath / OME-Zarr interop."""
