"""CPU cost per row of the ETL's image decoding on a web-photo-sized JPEG.

    python bench/bench_decode.py [--repeats 5] [--calls 50]

Encodes one photo-like 512 x 384 JPEG (smooth gradients plus noise, quality 90, ~100 KB:
docs/scaling.md's assumption A7 for web images) and times ``pipelines.decode.decode_image``
on it: decode, centre-crop and resize to the 224 px CLIP input, and re-encode the table's
image column at 64 px and at 256 px. Reports the median CPU milliseconds per row
(``time.process_time``: CPU time, so other processes on the machine change it little).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from pipelines.decode import decode_image


def photo_jpeg(width: int = 512, height: int = 384, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x / 2) % 256, (y / 1.5) % 256, ((x + y) / 3) % 256], -1)
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    data = photo_jpeg()
    print(f"JPEG 512x384, {len(data) / 1e3:.0f} KB")
    for out_size in (64, 256):
        runs = []
        for _ in range(args.repeats):
            t = time.process_time()
            for _ in range(args.calls):
                decode_image(data, 224, out_size)
            runs.append((time.process_time() - t) / args.calls * 1e3)
        print(
            f"-> 224 px CLIP input + {out_size} px image column: "
            f"{statistics.median(runs):.1f} CPU ms/row (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
