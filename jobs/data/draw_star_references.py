"""Draw the renderer's stars that `jobs/train_zip_star_styled_given.yaml` gives as training references:
two per world colour on a white background, placed and sized unlike the benchmark's user reference
(`benchmarks/zip_world.py`: centred, radius 20), so that what the benchmark reads is not trained on.

    python jobs/data/draw_star_references.py     # writes jobs/data/star_references/{color}_{k}.png
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.world import generator

FOLDER = Path(__file__).parent / "star_references"
PLACEMENTS = (((27.0, 35.0), 15.0), ((36.0, 29.0), 12.0))  # (centre, radius): off-centre, smaller than 20


def main() -> list[Path]:
    FOLDER.mkdir(exist_ok=True)
    written = []
    for color in generator.COLORS:
        for index, (center, radius) in enumerate(PLACEMENTS):
            star = generator.SceneObject(shape="star", color=color, center=center, radius=radius)
            scene = generator.Scene(objects=(star,), background="white", seed=index)
            path = FOLDER / f"{color}_{index}.png"
            Image.fromarray(generator.render(scene).image).save(path)
            written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
