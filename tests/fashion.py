"""A stand-in Fashion-MNIST for tests that run the commands which read it: learnable, small, in the Debian
package's layout (gzipped IDX files), found through ``NETSURGERY_FASHION_MNIST``."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def stand_in_fashion_mnist(root: Path, train: int = 5200, test: int = 300) -> Path:
    """Write ``train`` training and ``test`` test images (the class shows in the brightness) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return root
