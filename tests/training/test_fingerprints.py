"""Weight fingerprints, and the model card reading them without importing the training code."""

import hashlib
import subprocess
import sys

from pipeline.training.fingerprints import sha256_file, weight_fingerprints


def test_sha256_file_matches_hashlib_across_read_blocks(tmp_path):
    data = bytes(range(256)) * 8193  # a little over 2 MiB: several 1 MiB blocks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_weight_fingerprints_cover_safetensors_only_by_relative_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"b")
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "config.json").write_text("{}")
    assert weight_fingerprints(tmp_path) == {
        "a.safetensors": hashlib.sha256(b"a").hexdigest(),
        "sub/b.safetensors": hashlib.sha256(b"b").hexdigest(),
    }


def test_model_card_imports_without_the_training_code():
    """The card and the training CLI import each other's pieces through fingerprints only: no cycle."""
    code = (
        "import sys; import pipeline.world.model_card; "
        "loaded = [m for m in sys.modules if m.startswith(('pipeline.world.train', 'pipeline.training.'))]; "
        "print(sorted(loaded)); "
        "assert loaded == ['pipeline.training.fingerprints'], loaded; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
