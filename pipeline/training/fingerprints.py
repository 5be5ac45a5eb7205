"""sha256 fingerprints of weight files.

Standard library only: the model card (which records the fingerprints) and the training code (which
keys caches by them) both import it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks.

    Args:
        path: the file.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_fingerprints(assets: str | Path) -> dict[str, str]:
    """sha256 of every *.safetensors under `assets`, keyed by path relative to it.

    Args:
        assets: the folder searched recursively.

    Returns:
        {relative path: hex sha256}, sorted by path.
    """
    assets = Path(assets)
    return {
        str(path.relative_to(assets)): sha256_file(path) for path in sorted(assets.rglob("*.safetensors"))
    }
