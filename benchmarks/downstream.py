"""Does augmentation help a classifier on the rare class? The downstream benchmark on the shapes world.

    python -m benchmarks.downstream [--common 150] [--rare 5] [--sources 150] [--test 100] [--seeds 5]

1. Renders an imbalanced training set of one-object scenes (`--common` each of circle, square and
   triangle, `--rare` stars) and a balanced test set (`--test` per shape), from seed ranges that no
   shapes-world model was trained on.
2. Writes `--sources` of the common training images (equal per shape) as WebDataset shards and runs
   the augmentation job `jobs/downstream_star.yaml` on them with `inversa run` (direct inversion,
   word swap shape -> star with local blend, scored by the world's CLIP; filter `min_clip_t`). A rerun
   with the same settings reuses the job's output (the job resumes and finds every shard complete).
3. Trains the same small CNN (fixed step budget, Adam, seeded) on each training condition and reports
   the rare class's recall and the balanced accuracy on the test set, mean +- std over `--seeds`:

   (a) none                 the imbalanced set as it is
   (b) edits, unfiltered    + every edit the job wrote, labelled star
   (c) edits, filtered      + the edits that passed the job's filter
   (c*) edits, oracle       + the edits the oracle reads as stars (a reference: users have no oracle)
   (d) mix r                + a fraction r of the filtered edits; the filtered edits composited
                            into their sources (output.composite: the source's pixels outside the
                            edit's dilated, feathered mask); and filtered edits + the rare
                            originals repeated as often as there are edits
   (g) edits + recon        + the filtered edits + the VAE reconstructions of the edited sources,
                            labelled with their own shape: decoded images then occur in every class,
                            so the generator's signature no longer says "star"
   (e) classical            the rare images oversampled to `--common` with flips, quarter turns and
                            colour jitter (copy-paste oversampling)
   (f) upper bound          `--common` real stars

Writes benchmarks/results/downstream.json and downstream.png (recall per condition).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import nn

from pipeline.world import generator
from pipeline.world.shards import sample_record

ROOT = Path(__file__).resolve().parents[1]
JOB_SPEC = ROOT / "jobs" / "downstream_star.yaml"
RESULTS = ROOT / "benchmarks" / "results"
COMMON = ("circle", "square", "triangle")
RARE = "star"
CLASSES = (*COMMON, RARE)
TRAIN_SEED = 5_000_000  # the world models train on seeds < 16,000 and hold out from 1,000,000
TEST_SEED = 6_000_000
SHAPE_STRIDE = 100_000


@dataclass
class Split:
    """Images (N, 64, 64, 3) uint8 with labels (N,) int64 (index into CLASSES)."""

    images: np.ndarray
    labels: np.ndarray

    def __add__(self, other: Split) -> Split:
        return Split(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]))

    def __len__(self) -> int:
        return len(self.labels)


def scenes_of(shape: str, count: int, base_seed: int) -> list[generator.Scene]:
    """`count` one-object scenes of `shape`, seeds base_seed + SHAPE_STRIDE * shape index + i."""
    start = base_seed + SHAPE_STRIDE * CLASSES.index(shape)
    weights = {name: float(name == shape) for name in generator.SHAPES}
    return [generator.sample_scene(start + i, 0.0, shape_weights=weights) for i in range(count)]


def render_split(counts: dict[str, int], base_seed: int) -> tuple[Split, list[generator.Scene]]:
    """Render `counts[shape]` scenes of each shape."""
    scenes = [scene for shape, count in counts.items() for scene in scenes_of(shape, count, base_seed)]
    images = np.stack([generator.render(scene).image for scene in scenes])
    labels = np.array([CLASSES.index(scene.objects[0].shape) for scene in scenes], dtype=np.int64)
    return Split(images, labels), scenes


def write_source_shards(folder: Path, scenes: list[generator.Scene], shard_size: int = 16) -> list[str]:
    """The edit sources as WebDataset shards, in the layout `jobs/downstream_star.yaml` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(scenes), shard_size)):
        path = folder / f"shapes-{index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for scene in scenes[start : start + shard_size]:
                sink.write(sample_record(f"{scene.seed:09d}", generator.render(scene)))
        paths.append(str(path))
    return paths


def run_augmentation_job(shards: list[str], output: Path, overrides: list[str] = ()) -> dict:
    """`inversa run jobs/downstream_star.yaml` on the shards, `--set` each of `overrides` (KEY=VALUE);
    returns its manifest."""
    pattern = str(Path(shards[0]).parent / f"shapes-{{000000..{len(shards) - 1:06d}}}.tar")
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(JOB_SPEC),
        "--set",
        f"input.shards=['{pattern}']",
        "--output",
        str(output),
        *(argument for override in overrides for argument in ("--set", override)),
    ]
    started = time.time()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"the augmentation job failed ({completed.returncode}):\n{completed.stdout[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    manifest["benchmark_wall_s"] = round(time.time() - started, 1)
    return manifest


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def read_job(output: Path) -> dict[str, Split | np.ndarray]:
    """The job's edits (all, filtered, oracle-read stars) and the reconstructions of their sources."""
    import pipeline

    connection = pipeline.connect(str(output))
    edits = connection.sql(
        "select e.image, e.passed_filter, e.classified_as, s.reconstruction, s.source_class, e.composite_image "
        "from edits e join sources s using (source_id) order by e.edit_id"
    ).fetchall()
    if not edits:
        raise SystemExit(f"the augmentation job in {output} wrote no edits; see its errors table")
    images = np.stack([decode(row[0]) for row in edits])
    passed = np.array([bool(row[1]) for row in edits])
    oracle_star = np.array([row[2] == RARE for row in edits])
    star = np.full(len(edits), CLASSES.index(RARE), dtype=np.int64)
    recon = Split(
        np.stack([decode(row[3]) for row in edits]),
        np.array([CLASSES.index(row[4]) for row in edits], dtype=np.int64),
    )
    composites = [row[5] for row in edits]
    if None in composites:
        raise SystemExit(f"{output}: edits without a composite; the job must run with output.composite: true")
    return {
        "all": Split(images, star),
        "composited": Split(np.stack([decode(png) for png in composites]), star),
        "passed": passed,
        "oracle_star": oracle_star,
        "recon": recon,
    }


def subset(split: Split, keep: np.ndarray) -> Split:
    return Split(split.images[keep], split.labels[keep])


def classical_oversampling(rare: Split, target: int, rng: np.random.Generator) -> Split:
    """Copy-paste oversampling: the rare images repeated to `target` with flips, quarter turns and
    colour jitter (per-channel gain and offset)."""
    images = []
    for index in range(target):
        image = rare.images[index % len(rare)].astype(np.float32)
        if index >= len(rare):  # the originals once as they are, then augmented copies
            image = np.rot90(image, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                image = image[:, ::-1]
            image = image * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-15, 15, size=3)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return Split(np.stack(images), np.full(target, rare.labels[0], dtype=np.int64))


def repeat(split: Split, count: int) -> Split:
    index = np.arange(count) % len(split)
    return subset(split, index)


class SmallCNN(nn.Module):
    """The downstream classifier: three strided conv stages, global pooling, a linear layer."""

    def __init__(self, classes: int = len(CLASSES), widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_classifier(train: Split, seed: int, steps: int, batch: int = 64) -> SmallCNN:
    """Plain cross-entropy training for a fixed number of steps (every condition gets the same)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    images, labels = to_tensor(train.images), torch.from_numpy(train.labels)
    model.train()
    for _ in range(steps):
        index = torch.from_numpy(rng.integers(0, len(train), size=batch))
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: SmallCNN, test: Split) -> dict[str, float]:
    """Rare-class recall and balanced accuracy (mean per-class recall)."""
    predictions = torch.cat(
        [model(to_tensor(test.images[i : i + 256])).argmax(1) for i in range(0, len(test), 256)]
    )
    predictions = predictions.numpy()
    recalls = [float((predictions[test.labels == c] == c).mean()) for c in range(len(CLASSES))]
    return {"rare_recall": recalls[CLASSES.index(RARE)], "balanced_accuracy": float(np.mean(recalls))}


def conditions(train: Split, job: dict, common: int, rng: np.random.Generator) -> dict[str, Split]:
    """Every training condition of the module docstring, by name."""
    rare = subset(train, train.labels == CLASSES.index(RARE))
    edits_all, passed = job["all"], job["passed"]
    filtered = subset(edits_all, passed)
    chosen = {
        "(a) none": train,
        "(b) edits, unfiltered": train + edits_all,
        "(c) edits, filtered": train + filtered,
        "(c*) edits, oracle-read stars": train + subset(edits_all, job["oracle_star"]),
    }
    for ratio in (0.25, 0.5):
        keep = rng.permutation(len(filtered))[: max(1, round(ratio * len(filtered)))]
        chosen[f"(d) mix {ratio:g} of filtered"] = train + subset(filtered, np.sort(keep))
    chosen["(d) filtered, composited"] = train + subset(job["composited"], passed)
    chosen["(d) filtered + rare originals repeated"] = train + filtered + repeat(rare, len(filtered))
    chosen["(g) filtered + source reconstructions"] = train + filtered + subset(job["recon"], passed)
    others = subset(train, train.labels != CLASSES.index(RARE))
    chosen["(e) classical oversampling"] = others + classical_oversampling(rare, common, rng)
    return chosen


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    table = {}
    for name, values in runs.items():
        row = {}
        for metric in ("rare_recall", "balanced_accuracy"):
            series = np.array([value[metric] for value in values])
            row[metric] = round(float(series.mean()), 3)
            row[f"{metric}_std"] = round(float(series.std(ddof=1)) if len(series) > 1 else 0.0, 3)
        table[name] = row
    return table


def plot(table: dict[str, dict[str, float]], path: Path, setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for offset, metric in ((-0.2, "rare_recall"), (0.2, "balanced_accuracy")):
        axis.barh(
            np.arange(len(names)) + offset,
            [table[n][metric] for n in names],
            xerr=[table[n][f"{metric}_std"] for n in names],
            height=0.4,
            label=metric.replace("_", " "),
        )
    axis.set_yticks(np.arange(len(names)), names)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_title(textwrap.fill(setup, 100), fontsize=8)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--common", type=int, default=150, help="training images per common shape")
    parser.add_argument("--rare", type=int, default=5, help="training stars")
    parser.add_argument("--sources", type=int, default=150, help="common training images edited into stars")
    parser.add_argument("--test", type=int, default=100, help="test images per shape")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="classifier training steps (batch 64)")
    parser.add_argument("--work", default="out/downstream", help="shards and the job's output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run only the conditions whose names start so",
    )
    parser.add_argument(
        "--job-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the augmentation job (inversa run --set), e.g. inversion.encoder_fit_steps=200; "
        "give the run its own --work, since the job resumes what it finds there",
    )
    parser.add_argument("--results", default=str(RESULTS / "downstream"), help="writes .json and .png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sources > 3 * args.common:
        parser.error("--sources must be at most 3 x --common (the edits come from the training images)")

    train, train_scenes = render_split({**{s: args.common for s in COMMON}, RARE: args.rare}, TRAIN_SEED)
    test, _ = render_split({shape: args.test for shape in CLASSES}, TEST_SEED)
    per_shape = args.sources // len(COMMON)
    sources = [
        scene
        for shape in COMMON
        for scene in [s for s in train_scenes if s.objects[0].shape == shape][:per_shape]
    ]
    work = ROOT / args.work
    shards = write_source_shards(work / f"shards-{len(sources)}", sources)
    job_output = work / f"job-{len(sources)}"
    manifest = run_augmentation_job(shards, job_output, args.job_set)
    job = read_job(job_output)
    edits = len(job["all"])
    setup = (
        f"train {args.common}/shape + {args.rare} stars; {edits} edits of {len(sources)} sources "
        f"({int(job['passed'].sum())} pass the filter, {int(job['oracle_star'].sum())} read as stars by "
        f"the oracle); test {args.test}/shape; {args.seeds} seeds, {args.steps} steps"
        + "".join(f"; job --set {override}" for override in args.job_set)
    )
    print(setup, flush=True)

    runs: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        chosen = conditions(train, job, args.common, rng)
        upper, _ = render_split({RARE: args.common}, TRAIN_SEED + 50_000)  # more real stars, unseen seeds
        chosen["(f) upper bound: real stars"] = subset(train, train.labels != CLASSES.index(RARE)) + upper
        if args.only:
            chosen = {name: split for name, split in chosen.items() if name.startswith(tuple(args.only))}
        for name, split in chosen.items():
            runs.setdefault(name, []).append(evaluate(train_classifier(split, seed, args.steps), test))
        print(
            f"seed {seed}: "
            + ", ".join(f"{n.split(')')[0]})={runs[n][-1]['rare_recall']:.2f}" for n in runs),
            flush=True,
        )

    table = summarise(runs)
    sizes = {name: len(split) for name, split in chosen.items()}
    print("\n| condition | training images | rare recall | balanced accuracy |\n| --- | --- | --- | --- |")
    for name, row in table.items():
        print(
            f"| {name} | {sizes[name]} | {row['rare_recall']:.3f} +- {row['rare_recall_std']:.3f} | "
            f"{row['balanced_accuracy']:.3f} +- {row['balanced_accuracy_std']:.3f} |"
        )
    result = {"setup": setup, "job_counts": manifest["counts"], "sizes": sizes, "table": table, "runs": runs}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.results}.json").write_text(json.dumps(result, indent=1))
    plot(table, Path(f"{args.results}.png"), setup)
    return result


if __name__ == "__main__":
    main()
