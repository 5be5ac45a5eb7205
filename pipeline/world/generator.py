"""The shapes world: seeded 64x64 scenes of one or two coloured shapes on a background.

Every scene is a small record (`Scene`) of discrete attributes plus a continuous layout; `render`
turns it into pixels, a caption, per-object masks and an attributes dict. Because the layout and the
background texture depend only on the record, `counterfactual` re-renders the same scene with one
attribute changed: the ground-truth result of a perfect text-driven edit.

Caption grammar:
    one object:  ``a {color} {shape} on a {background} background``
    two objects: ``a {color} {shape} and a {color} {shape} on a {background} background``
                 (objects[0], the *primary* object, first; objects[1] is drawn on top of it).

Pure numpy/PIL: no files, no paths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered: anti-aliased edges, exact coverage

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SOLID_BACKGROUNDS = {"white": 255, "gray": 128, "black": 0}
TEXTURED_BACKGROUNDS = ("striped", "checkered", "cloudy")
BACKGROUNDS = tuple(SOLID_BACKGROUNDS) + TEXTURED_BACKGROUNDS
OBJECT_ATTRIBUTES = ("shape", "color")
EDITABLE_ATTRIBUTES = ("shape", "color", "background")
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "background": BACKGROUNDS}

# Radius ranges (pixels, centre to farthest point) for scenes of one and of two objects.
_RADIUS_ONE = (10.0, 20.0)
_RADIUS_TWO = (7.0, 12.0)


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    Attributes:
        shape: one of SHAPES.
        color: one of COLORS.
        center: (x, y) in pixels, origin top-left.
        radius: centre-to-vertex distance in pixels (circle radius; half the square's diagonal).
    """

    shape: str
    color: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """A scene record: everything `render` needs.

    Attributes:
        objects: one or two objects; objects[0] is the primary object (its shape is the scene's class).
        background: one of BACKGROUNDS.
        seed: seeds the background texture (so a counterfactual keeps the same texture).
    """

    objects: tuple[SceneObject, ...]
    background: str
    seed: int


@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene.

    Attributes:
        scene: the record it was rendered from.
        image: uint8 RGB, shape (64, 64, 3).
        caption: text following the module's grammar.
        masks: bool, shape (n_objects, 64, 64): each object's full silhouette (occluded part included).
        attributes: JSON-ready dict (shapes, colors, background, layout, mask bounding boxes).
    """

    scene: Scene
    image: np.ndarray
    caption: str
    masks: np.ndarray
    attributes: dict


def caption_for(scene: Scene) -> str:
    """The caption of a scene (see the module docstring for the grammar)."""
    objects = " and ".join(f"a {obj.color} {obj.shape}" for obj in scene.objects)
    return f"{objects} on a {scene.background} background"


def one_object_caption(color: str, shape: str, background: str) -> str:
    """`a {color} {shape} on a {background} background`, checking the vocabulary."""
    _check_value("color", color)
    _check_value("shape", shape)
    _check_value("background", background)
    return f"a {color} {shape} on a {background} background"


def parse_caption(caption: str) -> dict:
    """Inverse of `caption_for`: {'objects': [{'color', 'shape'}, ...], 'background'}.

    Raises:
        ValueError: if the caption does not follow the grammar or uses words outside the vocabulary.
    """
    words = caption.strip().split()
    if len(words) < 6 or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
        raise ValueError(
            f"caption {caption!r} does not follow 'a {{color}} {{shape}} [and a {{color}} {{shape}}] "
            "on a {background} background'"
        )
    background = words[-2]
    object_words = words[:-4]
    groups = [object_words[index : index + 3] for index in range(0, len(object_words), 4)]
    objects = []
    for position, group in enumerate(groups):
        joiner_ok = position == 0 or object_words[4 * position - 1] == "and"
        if len(group) != 3 or group[0] != "a" or not joiner_ok:
            raise ValueError(f"caption {caption!r}: malformed object phrase {' '.join(group)!r}")
        _check_value("color", group[1])
        _check_value("shape", group[2])
        objects.append({"color": group[1], "shape": group[2]})
    if len(objects) not in (1, 2):
        raise ValueError(f"caption {caption!r} names {len(objects)} objects; scenes hold one or two")
    _check_value("background", background)
    return {"objects": objects, "background": background}


def one_object_fields(caption: str) -> dict[str, str]:
    """The first object's colour and shape and the background of a caption, as keyword arguments of
    `one_object_caption`: {'color', 'shape', 'background'}.

    Raises:
        ValueError: as `parse_caption`.
    """
    parsed = parse_caption(caption)
    return {"background": parsed["background"], **parsed["objects"][0]}


def _check_value(attribute: str, value: str) -> None:
    if attribute not in ATTRIBUTE_VALUES:
        raise ValueError(f"unknown attribute {attribute!r}; editable attributes are {EDITABLE_ATTRIBUTES}")
    if value not in ATTRIBUTE_VALUES[attribute]:
        raise ValueError(
            f"{attribute} {value!r} is not in the shapes world; use one of {ATTRIBUTE_VALUES[attribute]}"
        )


def sample_scene(
    seed: int,
    two_object_fraction: float = 0.2,
    shape_weights: dict[str, float] | None = None,
    exclude_captions: frozenset[str] = frozenset(),
) -> Scene:
    """Draw a random scene from `seed` (deterministic: same seed, same scene).

    Args:
        seed: integer seed.
        two_object_fraction: probability of a two-object scene.
        shape_weights: relative frequency per shape for every object (default uniform); use it to make a
            shape deliberately rare.
        exclude_captions: captions never produced (held-out test captions); re-drawn if hit.
    """
    rng = np.random.default_rng(seed)
    probabilities = _shape_probabilities(shape_weights)
    for _ in range(1000):
        n_objects = 2 if rng.random() < two_object_fraction else 1
        low, high = _RADIUS_ONE if n_objects == 1 else _RADIUS_TWO
        objects: list[SceneObject] = []
        while len(objects) < n_objects:
            radius = float(rng.uniform(low, high))
            margin = radius + 1.0
            center = (
                float(rng.uniform(margin, IMAGE_SIZE - margin)),
                float(rng.uniform(margin, IMAGE_SIZE - margin)),
            )
            # Two objects keep apart enough that each stays mostly visible.
            if objects and math.dist(center, objects[0].center) < 0.9 * (radius + objects[0].radius):
                continue
            shape = str(rng.choice(SHAPES, p=probabilities))
            color = str(rng.choice(tuple(COLORS)))
            objects.append(SceneObject(shape, color, center, radius))
        scene = Scene(tuple(objects), str(rng.choice(BACKGROUNDS)), seed)
        if caption_for(scene) not in exclude_captions:
            return scene
    raise ValueError("exclude_captions rules out (almost) every scene; exclude fewer captions")


def _shape_probabilities(shape_weights: dict[str, float] | None) -> np.ndarray:
    if shape_weights is None:
        return np.full(len(SHAPES), 1.0 / len(SHAPES))
    unknown = set(shape_weights) - set(SHAPES)
    if unknown:
        raise ValueError(f"shape_weights names unknown shapes {sorted(unknown)}; shapes are {SHAPES}")
    weights = np.array([float(shape_weights.get(shape, 1.0)) for shape in SHAPES])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"shape_weights must be >= 0 with a positive sum, got {shape_weights}")
    return weights / weights.sum()


def render(scene: Scene) -> RenderedScene:
    """Render a scene.

    Returns:
        RenderedScene with image (64, 64, 3) uint8 and masks (n_objects, 64, 64) bool.
    """
    canvas = background_image(scene.background, scene.seed).astype(np.float32)
    coverages = [object_coverage(obj) for obj in scene.objects]
    for obj, coverage in zip(scene.objects, coverages, strict=True):
        alpha = coverage[..., None]
        canvas = canvas * (1.0 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = np.stack([coverage > 0 for coverage in coverages])
    return RenderedScene(scene, image, caption_for(scene), masks, _attributes(scene, masks))


def counterfactual(scene: Scene, attribute: str, value: str, object_index: int = 0) -> RenderedScene:
    """Render `scene` with one attribute changed and everything else (layout, texture) kept.

    Args:
        scene: the source scene.
        attribute: 'shape', 'color' (of object `object_index`) or 'background'.
        value: the new value, from the vocabulary.
        object_index: which object a shape/color edit applies to (0 = primary).

    Returns:
        The rendered ground-truth edit. Pixels change only inside the union of the edited object's
        old and new masks (shape/color edits) or outside all objects' masks (background edits).
    """
    return render(edit_scene(scene, attribute, value, object_index))


def edit_scene(scene: Scene, attribute: str, value: str, object_index: int = 0) -> Scene:
    """The scene record with one attribute replaced (see `counterfactual`)."""
    _check_value(attribute, value)
    if attribute == "background":
        return dataclasses.replace(scene, background=value)
    if not 0 <= object_index < len(scene.objects):
        raise ValueError(
            f"object_index {object_index} out of range: the scene has {len(scene.objects)} objects"
        )
    objects = list(scene.objects)
    objects[object_index] = dataclasses.replace(objects[object_index], **{attribute: value})
    return dataclasses.replace(scene, objects=tuple(objects))


def background_image(background: str, seed: int) -> np.ndarray:
    """Background pixels, uint8 (64, 64, 3); textures are fixed patterns (cloudy is seeded)."""
    _check_value("background", background)
    if background in SOLID_BACKGROUNDS:
        return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), SOLID_BACKGROUNDS[background], np.uint8)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if background == "striped":
        gray = np.where(((xs + ys) // 6) % 2 == 0, 210, 110)
    elif background == "checkered":
        gray = np.where(((xs // 8) + (ys // 8)) % 2 == 0, 200, 90)
    else:  # cloudy: smooth value noise, bilinear upsampling of a seeded 5x5 grid
        rng = np.random.default_rng([seed, 7])
        grid = rng.uniform(60, 200, size=(5, 5)).astype(np.float32)
        small = Image.fromarray(grid, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        gray = np.asarray(small)
        # Tint the clouds slightly blue so that they differ from gray in colour as well as texture.
        return np.clip(np.stack([gray * 0.85, gray * 0.9, gray * 1.1 + 10], axis=-1), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)


def shape_polygon(shape: str, center: tuple[float, float], radius: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the circle), in pixel coordinates."""
    cx, cy = center
    if shape == "circle":
        return None
    if shape == "square":
        half = radius / math.sqrt(2.0)
        return [
            (cx - half, cy - half),
            (cx + half, cy - half),
            (cx + half, cy + half),
            (cx - half, cy + half),
        ]
    if shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        return [
            (cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles
        ]
    if shape == "star":
        points = []
        for index in range(10):
            r = radius if index % 2 == 0 else radius * 0.45
            angle = math.radians(-90.0 + 36.0 * index)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    raise ValueError(f"shape {shape!r} is not in the shapes world; use one of {SHAPES}")


def object_coverage(obj: SceneObject) -> np.ndarray:
    """Fraction of each pixel the object covers, float32 (64, 64) in [0, 1]."""
    size = IMAGE_SIZE * SUPERSAMPLE
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    scale = SUPERSAMPLE
    polygon = shape_polygon(obj.shape, obj.center, obj.radius)
    if polygon is None:
        cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.radius * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in polygon], fill=255)
    return _downsampled(layer)


def polygon_coverage(points: np.ndarray) -> np.ndarray:
    """Fraction of each pixel a polygon covers, float32 (64, 64) in [0, 1], antialiased as objects are.

    Args:
        points: (N, 2) vertices (x, y) in pixel coordinates.
    """
    size = IMAGE_SIZE * SUPERSAMPLE
    layer = Image.new("L", (size, size), 0)
    ImageDraw.Draw(layer).polygon(
        [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in points], fill=255
    )
    return _downsampled(layer)


def _downsampled(layer: Image.Image) -> np.ndarray:
    high = np.asarray(layer, np.float32) / 255.0
    return high.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def object_outline(obj: SceneObject, points: int = 120) -> np.ndarray:
    """About `points` points (N, 2) along the object's outline in order: the circle's, or each polygon
    edge cut into equal pieces (so that the outline can be bent smoothly)."""
    polygon = shape_polygon(obj.shape, obj.center, obj.radius)
    if polygon is None:
        angles = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
        return np.stack(
            [obj.center[0] + obj.radius * np.cos(angles), obj.center[1] + obj.radius * np.sin(angles)], 1
        )
    corners = np.asarray(polygon, np.float64)
    per_edge = max(1, points // len(corners))
    steps = np.arange(per_edge)[:, None] / per_edge
    edges = [a + steps * (b - a) for a, b in zip(corners, np.roll(corners, -1, axis=0), strict=True)]
    return np.concatenate(edges)


def _attributes(scene: Scene, masks: np.ndarray) -> dict:
    objects = []
    for obj, mask in zip(scene.objects, masks, strict=True):
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None
        objects.append(
            {
                "shape": obj.shape,
                "color": obj.color,
                "center": [obj.center[0], obj.center[1]],
                "radius": obj.radius,
                "bbox_xyxy": bbox,
                "mask_area": int(mask.sum()),
            }
        )
    return {
        "shape": scene.objects[0].shape,
        "color": scene.objects[0].color,
        "background": scene.background,
        "n_objects": len(scene.objects),
        "objects": objects,
        "seed": scene.seed,
        "caption": caption_for(scene),
    }


def scene_from_attributes(attributes: dict) -> Scene:
    """Rebuild the exact `Scene` from the attributes dict that `render` returns (and shards store).

    Raises:
        ValueError: if a key is missing or a value is outside the vocabulary.
    """
    try:
        objects = tuple(
            SceneObject(
                obj["shape"],
                obj["color"],
                (float(obj["center"][0]), float(obj["center"][1])),
                float(obj["radius"]),
            )
            for obj in attributes["objects"]
        )
        scene = Scene(objects, attributes["background"], int(attributes["seed"]))
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(
            f"attributes dict lacks scene fields ({error!r}); pass the dict that render() returns"
        ) from error
    for obj in objects:
        _check_value("shape", obj.shape)
        _check_value("color", obj.color)
    _check_value("background", scene.background)
    return scene
