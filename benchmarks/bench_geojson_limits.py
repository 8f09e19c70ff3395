"""Cost of reading an untrusted GeoJSON with limits (streamed size cap + nesting check) against a
plain ``json.loads`` of the same bytes, measured in the same run.

    python benchmarks/bench_geojson_limits.py [--features 100000]

Prints the seconds of each and the ratio (limits / plain).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cellcurate.curation.qupath import _load_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=100_000)
    args = ap.parse_args()
    ring = [[x, y] for x, y in [(0, 0), (4, 0), (6, 3), (4, 6), (0, 6), (-2, 3), (0, 0)]]
    feats = [{"type": "Feature", "id": f"id-{i}", "geometry": {"type": "Polygon", "coordinates": [ring]},
              "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [1, 2, 3]},
                             "metadata": {"nucleus_id": str(i), "note": "a [bracket] in a string"}}}
             for i in range(args.features)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        t0 = time.perf_counter()
        json.loads(path.read_bytes().decode("utf-8"))
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        _load_json(path)
        limited = time.perf_counter() - t0
        size = path.stat().st_size
    print(f"{args.features:,} features, {size / 2**20:.1f} MiB: plain json.loads {plain:.3f} s, "
          f"with limits {limited:.3f} s, ratio {limited / plain:.2f}")


if __name__ == "__main__":
    main()
