"""Shards written by pipeline.world.shards read back with webdataset to the same scenes."""

import json

import numpy as np
import pytest
import webdataset as wds

from pipeline.world import generator
from pipeline.world.shards import main, write_shards


def _read(paths):
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8")
    return list(dataset)


def test_round_trip_matches_the_renderer(tmp_path):
    paths = write_shards(tmp_path, count=10, shard_size=4, seed=100, two_object_fraction=0.5)
    assert [p.name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    samples = _read(paths)
    assert len(samples) == 10
    for sample in samples:
        attributes = sample["json"]
        scene = generator.scene_from_attributes(attributes)
        rendered = generator.render(scene)
        np.testing.assert_array_equal(sample["png"], rendered.image)
        assert sample["txt"] == rendered.caption
        assert generator.SHAPES[sample["cls"]] == sample["class.txt"] == scene.objects[0].shape
        labels = sample["mask.png"][..., 0]
        # Topmost-object label map agrees with the silhouettes: the last object wins where they overlap.
        expected = np.zeros((64, 64), np.uint8)
        for index, mask in enumerate(rendered.masks):
            expected[mask] = index + 1
        np.testing.assert_array_equal(labels, expected)
        assert json.loads(json.dumps(attributes)) == rendered.attributes


def test_cli_rare_shape_fraction(tmp_path):
    main([str(tmp_path), "--count", "400", "--shard-size", "200", "--seed", "7", "--rare-shape", "star"])
    classes = [s["class.txt"] for s in _read(sorted(tmp_path.glob("*.tar")))]
    assert len(classes) == 400
    assert 0 < classes.count("star") < 0.1 * len(classes)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="--rare-shape"):
        write_shards(tmp_path, 4, 2, rare_shape="hexagon")
    with pytest.raises(ValueError, match="--count"):
        write_shards(tmp_path, 0, 2)


def test_committed_sample_shards_hold_a_rare_star():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "jobs" / "data" / "shapes_sample"
    samples = _read(sorted(folder.glob("*.tar")))
    classes = [s["class.txt"] for s in samples]
    assert 24 <= len(samples) <= 100
    assert 0 < classes.count("star") <= 0.1 * len(samples)
