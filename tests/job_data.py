"""Tiny WebDataset shards for the job's tests: good samples of several classes and formats, and the
bad cases the job must survive (corrupt image, missing caption, non-image member, truncated tar)."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image


@dataclass
class Sample:
    """One sample as written; `bad` says which error row the reader must produce (None = good)."""

    key: str
    members: dict[str, bytes]
    source_class: str | None = None
    bad: str | None = None
    meta: dict = field(default_factory=dict)


def image_bytes(
    seed: int,
    size: tuple[int, int] = (40, 48),
    fmt: str = "PNG",
    mode: str = "RGB",
    exif_orientation: int | None = None,
) -> bytes:
    """A random image of `size` (width, height) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def good(
    key: str, cls: str, seed: int, fmt: str = "PNG", ext: str = "png", color: str = "red", **image_kwargs
) -> Sample:
    members = {
        ext: image_bytes(seed, fmt=fmt, **image_kwargs),
        "txt": f"a photo of a {color} {cls}".encode(),
        "cls": cls.encode(),
        "json": json.dumps({"color": color}).encode(),
    }
    return Sample(key, members, cls, meta={"color": color})


def write_tar(path: Path, samples: list[Sample], truncate: bool = False) -> Path:
    """Write samples as a tar; `truncate` cuts the file in the middle of the last member's data."""
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for extension, data in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    if truncate:
        with tarfile.open(path) as archive:
            last = archive.getmembers()[-1]
        path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    return path


def job_shards(folder: Path) -> tuple[list[Path], dict[str, list[Sample]]]:
    """Three shards: shard-000000.tar, shard-000001.tar, shard-000002.tar (the last one truncated).

    Returns:
        (paths, {shard file name: samples}); a sample's `bad` names the error the reader must report.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shard0 = [
        good("s0/cat-a", "cat", 1),
        good("s0/dog-a", "dog", 2, fmt="JPEG", ext="jpg", color="blue", exif_orientation=6),
        good("s0/cat-b", "cat", 3, fmt="WEBP", ext="webp"),
        Sample(
            "s0/corrupt",
            {"jpg": b"\xff\xd8\xff this is not a jpeg", "txt": b"a photo of a cat", "cls": b"cat"},
            "cat",
            bad="CorruptImage",
        ),
    ]
    nocaption = good("s1/nocap", "dog", 5)
    del nocaption.members["txt"]
    nocaption.bad = "MissingField"
    shard1 = [
        good("s1/dog-b", "dog", 4, mode="RGBA", color="green"),
        nocaption,
        Sample("s1/readme", {"md": b"# not an image"}, None, bad="MissingField"),
        good("s1/fox-a", "fox", 6, mode="L"),
    ]
    shard2 = [
        good("s2/cat-c", "cat", 7),
        good("s2/dog-c", "dog", 8),
        good("s2/cat-d", "cat", 9, size=(64, 64)),
    ]
    paths = [
        write_tar(folder / "shard-000000.tar", shard0),
        write_tar(folder / "shard-000001.tar", shard1),
        # Cut inside the last sample: the first two samples survive, plus one TruncatedTar row.
        write_tar(folder / "shard-000002.tar", shard2, truncate=True),
    ]
    shard2[2].bad = "TruncatedTar"
    return paths, {"shard-000000.tar": shard0, "shard-000001.tar": shard1, "shard-000002.tar": shard2}


class TinyFeatures(torch.nn.Module):
    """A seeded random two-level conv feature net for the `features:tiny` perceptual backbone
    (LPIPS's torchvision trunks cannot be downloaded here)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * 0.3
            conv.bias.data.zero_()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [(B, 8, H, W), (B, 16, H/2, W/2)]."""
        first = torch.relu(self.conv1(images * 2 - 1))
        return [first, torch.relu(self.conv2(first))]


def tiny_features() -> TinyFeatures:
    return TinyFeatures().eval()


def tiny_classifier():
    """A hand-written classifier for `metrics.classifier`: "fox" when an image is on average at least as
    red as it is blue, else "dog" (images (B, 3, H, W) in [0, 1] -> B names)."""

    def classify(images: torch.Tensor) -> list[str]:
        channel_means = images.mean(dim=(2, 3))
        return ["fox" if red >= blue else "dog" for red, blue in channel_means[:, [0, 2]].tolist()]

    return classify


def fake_model(folder: Path, weights: bool = True) -> Path:
    """A diffusers-layout folder with configs (and, if asked, placeholder weight files)."""
    configs = {"unet": {"sample_size": 4}, "vae": {"block_out_channels": [8, 8, 8, 8]}, "text_encoder": {}}
    for part, config in configs.items():
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
        if weights:
            (folder / part / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer").mkdir()
    return folder


def write_small_shards(folder: Path, count: int) -> list[Path]:
    """`count` shards shard-000000.tar, ... of one good cat sample each."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"shard-{i:06d}.tar", [good(f"k{i}", "cat", i)]) for i in range(count)]


def spec(tmp_path: Path, **changes) -> Path:
    """A job spec (tmp_path/job.yaml) that passes every pre-flight check: three one-sample shards, a
    configs-only model folder, a checkpoint file, the tiny factories; `changes` set dotted keys."""
    write_small_shards(tmp_path / "data", 3)
    clip = tmp_path / "clip.safetensors"
    clip.write_bytes(b"clip")
    (tmp_path / "tiny.json").write_text("{}")
    data = {
        "input": {"shards": [str(tmp_path / "data/shard-{000000..000002}.tar")]},
        "model": {"path": str(fake_model(tmp_path / "model")), "device": "cpu"},
        "edits": [{"target_class": "fox"}],
        "metrics": {
            "clip": {
                "model_name": "tiny",
                "pretrained": str(clip),
                "config_file": str(tmp_path / "tiny.json"),
            },
            "perceptual": "features:tiny",
            "feature_extractor": f"{Path(__file__)}:tiny_features",
            "classifier": f"{Path(__file__)}:tiny_classifier",
        },
        "resources": {"invert_edit": {"num_cpus": 0.25}, "score": {"num_cpus": 0.25}},
        "output": {"path": str(tmp_path / "out")},
    }
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
