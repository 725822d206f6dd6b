"""Synthetic referring-segmentation data: coloured shapes in images and short clips, with prompts that need the text.

Every sample is a scene of 2–4 (configurable) flat-coloured shapes — circles, squares and triangles in red, green,
blue, yellow, … — on a plain or lightly textured grey background. Videos are short clips in which every shape
either moves linearly (up, down, left or right, with a small sideways drift) or stays still. Each sample carries
one referring prompt that identifies exactly one object of the scene (or, for a share of the samples, two
objects joined by "and"):

==============  =====================================================  =================================
kind            examples                                               media
==============  =====================================================  =================================
``color_shape`` "the red circle", "the square that is blue"            images and videos
``color``       "the blue shape", "the yellow object"                  images and videos
``shape``       "the triangle", "the circle shape"                     images and videos
``position``    "the square on the left", "the topmost red shape"      images
``motion``      "the shape that moves up", "the green circle moving    videos
                left", "the square that does not move"
==============  =====================================================  =================================

A prompt is only emitted when exactly one object satisfies it (a position is only used among at least two
candidates and with a clear margin); otherwise another prompt or another scene is drawn. The ground-truth masks
are the *visible* pixels of each referred object in every frame (shapes drawn later occlude earlier ones, with the
overlap limited so that every object stays mostly visible).

Generation is deterministic: sample ``i`` of split ``s`` depends only on ``(config, s, i)`` through
``numpy.random.SeedSequence``, so a dataset of ``n`` samples is a prefix of one of ``n + k`` samples. Held-out
splits never share an image or clip with the training split, by construction: the pixels of every candidate scene
are hashed and a scene is only accepted by the split that owns its hash bucket (train 6/8 of the buckets,
validation 1/8, test 1/8), on top of the split seeds being different. :func:`assert_disjoint` checks it on
generated datasets.

The records follow :data:`transformers_maskcma.data.schema.RECORD_FEATURES`; the frames are stored as PNG bytes
so a dataset is self-contained, and the ``meta`` column is a JSON object with every object's attributes (shape,
colour, RGB value, size, per-frame centre, motion), the targets and the structured query of the prompt.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .schema import RECORD_FEATURES, encode_rle, make_meta

__all__ = [
    "COLOR_PALETTE",
    "DEFAULT_SPLIT_SIZES",
    "MOTIONS",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "SyntheticConfig",
    "assert_disjoint",
    "generate_synthetic",
    "load_synthetic",
    "shuffled_prompts",
]

#: Named colours and their base RGB values. All are strongly saturated (max − min channel ≥ 140), so they are never
#: confused with the grey background (max − min channel ≤ 30).
COLOR_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 50, 210),
    "orange": (245, 140, 25),
    "cyan": (30, 200, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Motions of a shape in a clip: the direction of its displacement, or ``"still"``.
MOTIONS: tuple[str, ...] = ("up", "down", "left", "right", "still")
#: Relative positions used by image prompts.
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Number of samples :func:`load_synthetic` generates when ``num_samples`` is not given.
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
# A scene whose pixel hash falls in bucket b (of _NUM_BUCKETS) may only be used by the split that owns b.
_NUM_BUCKETS = 8
_SPLIT_BUCKETS = {"train": frozenset(range(6)), "validation": frozenset({6}), "test": frozenset({7})}

_IMAGE_PROMPT_KINDS = {"color_shape": 0.35, "color": 0.2, "shape": 0.15, "position": 0.3}
_VIDEO_PROMPT_KINDS = {"motion": 0.55, "color_shape": 0.25, "color": 0.1, "shape": 0.1}
_MAX_SCENE_ATTEMPTS = 1000
_MAX_PLACEMENT_ATTEMPTS = 60
_MAX_BACKGROUND_SPREAD = 30


@dataclass(frozen=True)
class SyntheticConfig:
    """How synthetic scenes look.

    Sizes, motions and margins are fractions of ``image_size`` so that a config scales with the resolution.

    Args:
        image_size: side of the square frames in pixels.
        num_frames: frames per video clip (images have one frame).
        min_shapes / max_shapes: number of shapes per scene, drawn uniformly in ``[min_shapes, max_shapes]``.
        min_shape_size / max_shape_size: shape size (circle diameter, square side, triangle base and height) as a
            fraction of ``image_size``.
        video_fraction: share of samples that are videos.
        multi_object_fraction: share of samples whose prompt refers to two objects ("the red circle and the blue
            square", answer ``"[SEG] and [SEG]."``); needs ``max_shapes >= 2``.
        colors / shapes: vocabulary of the scenes (names from :data:`COLOR_PALETTE` and :data:`SHAPES`).
        textured_fraction: share of samples with a lightly textured (smooth noise) background instead of a plain one.
        texture_strength: amplitude of the background texture in grey levels.
        color_jitter: each object's RGB value is its palette colour plus a uniform offset in
            ``[-color_jitter, color_jitter]`` per channel (the object itself stays flat).
        max_pair_overlap: largest share of either shape's area that two shapes may overlap in any frame.
        min_visible_fraction: every object keeps at least this share of its area visible in every frame.
        min_motion / max_motion: total displacement of a moving shape over the clip.
        still_fraction: probability that a shape in a clip does not move.
        position_margin: a position prompt ("the square on the left") is only used when the referred shape's
            centre is at least this far beyond every other candidate's centre along that axis.
        seed: base seed; splits and samples derive their own seeds from it.
    """

    image_size: int = 128
    num_frames: int = 8
    min_shapes: int = 2
    max_shapes: int = 4
    min_shape_size: float = 0.15
    max_shape_size: float = 0.3
    video_fraction: float = 0.3
    multi_object_fraction: float = 0.1
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    textured_fraction: float = 0.5
    texture_strength: float = 12.0
    color_jitter: int = 12
    max_pair_overlap: float = 0.15
    min_visible_fraction: float = 0.6
    min_motion: float = 0.25
    max_motion: float = 0.45
    still_fraction: float = 0.2
    position_margin: float = 0.12
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "colors", tuple(self.colors))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        self._check_range("image_size", self.image_size, 32, 4096)
        self._check_range("num_frames", self.num_frames, 2, 256)
        self._check_range("min_shapes", self.min_shapes, 1, 8)
        self._check_range("max_shapes", self.max_shapes, self.min_shapes, 8, hint="and at least min_shapes")
        self._check_range("min_shape_size", self.min_shape_size, 0.05, 0.5)
        self._check_range(
            "max_shape_size", self.max_shape_size, self.min_shape_size, 0.5, hint="and ≥ min_shape_size"
        )
        for name in ("video_fraction", "multi_object_fraction", "textured_fraction", "still_fraction"):
            self._check_range(name, getattr(self, name), 0.0, 1.0)
        self._check_range("texture_strength", self.texture_strength, 0.0, 12.0)
        self._check_range("color_jitter", self.color_jitter, 0, 15)
        self._check_range("max_pair_overlap", self.max_pair_overlap, 0.0, 0.4)
        self._check_range("min_visible_fraction", self.min_visible_fraction, 0.3, 1.0)
        self._check_range("min_motion", self.min_motion, 0.1, 0.6)
        self._check_range("max_motion", self.max_motion, self.min_motion, 0.6, hint="and ≥ min_motion")
        self._check_range("position_margin", self.position_margin, 0.0, 0.5)
        if self.max_shape_size + 1.2 * self.max_motion > 0.95:
            raise ValueError(
                f"SyntheticConfig: max_shape_size + 1.2 * max_motion = "
                f"{self.max_shape_size + 1.2 * self.max_motion:.2f} leaves no room for a moving shape to stay inside "
                "the frame; lower max_shape_size or max_motion so that the sum is at most 0.95"
            )
        unknown_colors = [c for c in self.colors if c not in COLOR_PALETTE]
        if not self.colors or unknown_colors or len(set(self.colors)) != len(self.colors):
            raise ValueError(
                f"SyntheticConfig.colors={self.colors!r}: give one or more distinct names from "
                f"{sorted(COLOR_PALETTE)} (unknown: {unknown_colors})"
            )
        unknown_shapes = [s for s in self.shapes if s not in SHAPES]
        if not self.shapes or unknown_shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(
                f"SyntheticConfig.shapes={self.shapes!r}: give one or more distinct names from {list(SHAPES)} "
                f"(unknown: {unknown_shapes})"
            )
        if self.multi_object_fraction > 0 and self.max_shapes < 2:
            raise ValueError(
                f"SyntheticConfig: multi_object_fraction={self.multi_object_fraction} needs scenes with two or more "
                f"shapes, but max_shapes={self.max_shapes}; raise max_shapes or set multi_object_fraction=0"
            )

    def _check_range(self, name: str, value: float, low: float, high: float, hint: str = "") -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            suffix = f" {hint}" if hint else ""
            raise ValueError(
                f"SyntheticConfig.{name}={value!r} is out of range: use a number in [{low}, {high}]{suffix}"
            )


@dataclass
class _Shape:
    """One object of a scene. ``centers`` has shape ``(num_frames, 2)`` as ``(x, y)`` in pixels."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    size: float
    centers: np.ndarray
    motion: str | None
    masks: np.ndarray = field(repr=False)  # (num_frames, height, width) bool, the full (unoccluded) shape


@dataclass(frozen=True)
class _Query:
    """The structured meaning of one referring expression; ``None`` fields are unconstrained."""

    color: str | None = None
    shape: str | None = None
    position: str | None = None
    motion: str | None = None

    @property
    def kind(self) -> str:
        if self.motion is not None:
            return "motion"
        if self.position is not None:
            return "position"
        if self.color is not None and self.shape is not None:
            return "color_shape"
        return "color" if self.color is not None else "shape"


# ----------------------------------------------------------------------------------------------- drawing


def _shape_masks(shape: str, size: float, centers: np.ndarray, image_size: int) -> np.ndarray:
    """Rasterise ``shape`` at every centre; returns ``(num_frames, image_size, image_size)`` bool.

    A pixel belongs to the shape when its centre ``(x + 0.5, y + 0.5)`` lies inside it. Circles have diameter
    ``size``; squares are axis-aligned with side ``size``; triangles point up with base and height ``size``.
    """
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    dx = coords[None, None, :] - centers[:, 0, None, None]  # (T, 1, W)
    dy = coords[None, :, None] - centers[:, 1, None, None]  # (T, H, 1)
    half = size / 2.0
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        depth = (dy + half) / size  # 0 at the apex, 1 at the base
        return (depth >= 0.0) & (depth <= 1.0) & (np.abs(dx) <= depth * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def _smooth_noise(rng: np.random.Generator, image_size: int, cells: int) -> np.ndarray:
    """Smooth noise in about ``[-1, 1]`` of shape ``(image_size, image_size)``: a ``cells × cells`` grid of
    uniform values, bilinearly interpolated."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    positions = (np.arange(image_size) + 0.5) / image_size * cells
    lower = np.clip(np.floor(positions).astype(int), 0, cells - 1)
    weight = positions - lower
    interpolation = np.zeros((image_size, cells + 1))
    interpolation[np.arange(image_size), lower] = 1.0 - weight
    interpolation[np.arange(image_size), lower + 1] = weight
    return interpolation @ grid @ interpolation.T


def _background(rng: np.random.Generator, config: SyntheticConfig) -> tuple[np.ndarray, str]:
    """A near-grey background of shape ``(H, W, 3)`` uint8 and its kind (``"plain"`` or ``"textured"``).

    The channels differ by at most :data:`_MAX_BACKGROUND_SPREAD` at every pixel, so the background never takes a
    shape's saturated colour."""
    size = config.image_size
    gray = rng.uniform(70.0, 190.0)
    tint = rng.uniform(-6.0, 6.0, size=3)
    image = np.full((size, size, 3), gray, dtype=np.float64) + tint
    kind = "plain"
    if rng.random() < config.textured_fraction:
        kind = "textured"
        image += config.texture_strength * _smooth_noise(rng, size, int(rng.integers(3, 9)))[:, :, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), kind


def _compose(background: np.ndarray, shapes: list[_Shape]) -> tuple[np.ndarray, np.ndarray]:
    """Paint the shapes in order over the background.

    Returns the frames ``(T, H, W, 3)`` uint8 and the visible masks ``(num_shapes, T, H, W)`` bool (a shape's
    pixels not covered by a shape painted after it)."""
    num_frames = shapes[0].masks.shape[0]
    frames = np.repeat(background[None], num_frames, axis=0)
    owner = np.full(frames.shape[:3], -1, dtype=np.int16)
    for index, shape in enumerate(shapes):
        frames[shape.masks] = shape.rgb
        owner[shape.masks] = index
    visible = owner[None] == np.arange(len(shapes), dtype=np.int16)[:, None, None, None]
    return frames, visible


# ----------------------------------------------------------------------------------------------- scenes


def _sample_motion(rng: np.random.Generator, config: SyntheticConfig) -> tuple[str, np.ndarray]:
    """A motion name and the total displacement ``(dx, dy)`` in pixels over the clip (image y points down)."""
    if rng.random() < config.still_fraction:
        return "still", np.zeros(2)
    motion = MOTIONS[int(rng.integers(0, 4))]
    along = rng.uniform(config.min_motion, config.max_motion) * config.image_size
    across = rng.uniform(-0.2, 0.2) * along
    displacement = {
        "up": (across, -along),
        "down": (across, along),
        "left": (-along, across),
        "right": (along, across),
    }[motion]
    return motion, np.asarray(displacement, dtype=np.float64)


def _sample_shape(rng: np.random.Generator, config: SyntheticConfig, num_frames: int, is_video: bool) -> _Shape:
    """One shape with a random kind, colour, size and (for clips) linear trajectory, fully inside the frame."""
    image_size = config.image_size
    shape = config.shapes[int(rng.integers(len(config.shapes)))]
    color = config.colors[int(rng.integers(len(config.colors)))]
    jitter = rng.integers(-config.color_jitter, config.color_jitter + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.asarray(COLOR_PALETTE[color]) + jitter, 0, 255))
    size = rng.uniform(config.min_shape_size, config.max_shape_size) * image_size
    motion, displacement = _sample_motion(rng, config) if is_video else (None, np.zeros(2))
    half = size / 2.0 + 1.0
    low = half + np.maximum(0.0, -displacement)
    high = image_size - half - np.maximum(0.0, displacement)
    start = rng.uniform(low, high)
    steps = np.linspace(0.0, 1.0, num_frames)[:, None] if num_frames > 1 else np.zeros((1, 1))
    centers = start[None, :] + steps * displacement[None, :]
    masks = _shape_masks(shape, size, centers, image_size)
    return _Shape(shape, color, rgb, float(size), centers, motion, masks)


def _overlap_ok(candidate: _Shape, placed: list[_Shape], max_overlap: float) -> bool:
    """Whether ``candidate`` overlaps every placed shape by at most ``max_overlap`` of either area, in every frame."""
    candidate_area = candidate.masks.sum(axis=(1, 2))
    for other in placed:
        intersection = (candidate.masks & other.masks).sum(axis=(1, 2))
        smaller = np.minimum(candidate_area, other.masks.sum(axis=(1, 2)))
        if np.any(intersection > max_overlap * smaller):
            return False
    return True


def _sample_scene(rng: np.random.Generator, config: SyntheticConfig, is_video: bool) -> list[_Shape] | None:
    """Shapes placed one by one with limited pairwise overlap; ``None`` when a shape found no place."""
    num_frames = config.num_frames if is_video else 1
    num_shapes = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    placed: list[_Shape] = []
    for _ in range(num_shapes):
        for _ in range(_MAX_PLACEMENT_ATTEMPTS):
            candidate = _sample_shape(rng, config, num_frames, is_video)
            if candidate.masks.sum(axis=(1, 2)).min() > 0 and _overlap_ok(candidate, placed, config.max_pair_overlap):
                placed.append(candidate)
                break
        else:
            return None
    return placed


# ----------------------------------------------------------------------------------------------- prompts


def _matches(shape: _Shape, query: _Query) -> bool:
    """Whether a shape has the query's colour, kind and motion (position is relative, see :func:`_referents`)."""
    return (
        (query.color is None or shape.color == query.color)
        and (query.shape is None or shape.shape == query.shape)
        and (query.motion is None or shape.motion == query.motion)
    )


def _referents(shapes: list[_Shape], query: _Query, margin: float) -> list[int]:
    """Indices of the shapes the query describes.

    Without a position, every matching shape. With a position, the matching shape whose first-frame centre is
    beyond every other matching shape's centre by more than ``margin`` pixels along that axis — if there are at
    least two matching shapes and one such shape exists; otherwise nothing (the position would be meaningless).
    """
    candidates = [i for i, shape in enumerate(shapes) if _matches(shape, query)]
    if query.position is None:
        return candidates
    if len(candidates) < 2:
        return []
    axis, sign = {"left": (0, -1.0), "right": (0, 1.0), "top": (1, -1.0), "bottom": (1, 1.0)}[query.position]
    scores = np.array([sign * shapes[i].centers[0, axis] for i in candidates])
    order = np.argsort(-scores, kind="stable")
    if scores[order[0]] - scores[order[1]] <= margin:
        return []
    return [candidates[int(order[0])]]


def _unique_queries(
    shapes: list[_Shape], config: SyntheticConfig, is_video: bool
) -> dict[str, list[tuple[_Query, int]]]:
    """Every query (of the kinds allowed for the media) that refers to exactly one shape, grouped by kind."""
    colors = sorted({shape.color for shape in shapes})
    kinds = sorted({shape.shape for shape in shapes})
    margin = config.position_margin * config.image_size
    attribute_filters = [(c, s) for c in [None, *colors] for s in [None, *kinds]]
    queries: list[_Query] = [_Query(color=c, shape=s) for c, s in attribute_filters if (c, s) != (None, None)]
    if is_video:
        motions = sorted({shape.motion for shape in shapes})
        queries += [_Query(color=c, shape=s, motion=m) for c, s in attribute_filters for m in motions]
    else:
        queries += [_Query(color=c, shape=s, position=p) for c, s in attribute_filters for p in POSITIONS]
    unique: dict[str, list[tuple[_Query, int]]] = {}
    for query in queries:
        referents = _referents(shapes, query, margin)
        if len(referents) == 1:
            unique.setdefault(query.kind, []).append((query, referents[0]))
    return unique


_POSITION_TEMPLATES = {
    "left": ("the {subject} on the left", "the leftmost {subject}"),
    "right": ("the {subject} on the right", "the rightmost {subject}"),
    "top": ("the {subject} at the top", "the topmost {subject}", "the highest {subject}"),
    "bottom": ("the {subject} at the bottom", "the bottommost {subject}", "the lowest {subject}"),
}
_MOTION_TEMPLATES = {
    "still": ("the {subject} that does not move", "the {subject} that stays still", "the static {subject}"),
    **{
        direction: (
            f"the {{subject}} that moves {direction}",
            f"the {{subject}} moving {direction}",
            f"the {{subject}} going {direction}",
        )
        for direction in ("up", "down", "left", "right")
    },
}


def _describe(query: _Query, rng: np.random.Generator) -> str:
    """A natural-language referring expression for ``query`` (always starts with "the", never contains "and")."""

    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    if query.color is not None and query.shape is not None:
        subject = f"{query.color} {query.shape}"
    elif query.color is not None:
        subject = f"{query.color} {pick(('shape', 'object'))}"
    elif query.shape is not None:
        subject = query.shape
    else:
        subject = pick(("shape", "object"))
    if query.motion is not None:
        return pick(_MOTION_TEMPLATES[query.motion]).format(subject=subject)
    if query.position is not None:
        return pick(_POSITION_TEMPLATES[query.position]).format(subject=subject)
    if query.color is not None and query.shape is not None:
        return pick((f"the {subject}", f"the {query.shape} that is {query.color}"))
    if query.shape is not None:
        return pick((f"the {subject}", f"the {subject} shape"))
    return f"the {subject}"


def _choose_query(
    rng: np.random.Generator, unique: dict[str, list[tuple[_Query, int]]], weights: dict[str, float], exclude: set[int]
) -> tuple[_Query, int] | None:
    """Draw a prompt kind (by ``weights``, among the kinds available) and then a query of that kind uniformly,
    skipping queries whose referent is in ``exclude``."""
    options = {
        kind: [(q, t) for q, t in unique.get(kind, []) if t not in exclude] for kind in weights
    }
    kinds = [kind for kind in weights if options[kind]]
    if not kinds:
        return None
    probabilities = np.array([weights[kind] for kind in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=probabilities / probabilities.sum()))]
    return options[kind][int(rng.integers(len(options[kind])))]


# ----------------------------------------------------------------------------------------------- records


def _encode_png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _bucket(frames: np.ndarray) -> tuple[int, str]:
    """The split bucket of a scene and the hex digest of its pixels (``frames`` is ``(T, H, W, 3)`` uint8)."""
    digest = hashlib.sha256()
    digest.update(np.asarray(frames.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(frames).tobytes())
    hexdigest = digest.hexdigest()
    return int(hexdigest[:8], 16) % _NUM_BUCKETS, hexdigest


def _sample_seed(config: SyntheticConfig, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=[config.seed, _SPLIT_IDS[split], index])


def _make_record(config: SyntheticConfig, split: str, index: int) -> dict:
    """Sample ``index`` of ``split``: draw scenes until one is valid, belongs to the split and has a prompt."""
    rng = np.random.Generator(np.random.PCG64(_sample_seed(config, split, index)))
    for attempt in range(_MAX_SCENE_ATTEMPTS):
        is_video = bool(rng.random() < config.video_fraction)
        want_two = bool(rng.random() < config.multi_object_fraction)
        background, background_kind = _background(rng, config)
        shapes = _sample_scene(rng, config, is_video)
        if shapes is None:
            continue
        frames, visible = _compose(background, shapes)
        full_area = np.stack([shape.masks.sum(axis=(1, 2)) for shape in shapes])  # (N, T)
        if np.any(visible.sum(axis=(2, 3)) < config.min_visible_fraction * full_area):
            continue
        bucket, digest = _bucket(frames)
        if bucket not in _SPLIT_BUCKETS[split]:
            continue
        weights = _VIDEO_PROMPT_KINDS if is_video else _IMAGE_PROMPT_KINDS
        unique = _unique_queries(shapes, config, is_video)
        chosen: list[tuple[_Query, int]] = []
        for _ in range(2 if want_two and len(shapes) >= 2 else 1):
            pick = _choose_query(rng, unique, weights, exclude={target for _, target in chosen})
            if pick is None:
                break
            chosen.append(pick)
        if not chosen or (want_two and len(chosen) < 2 and len(shapes) >= 2):
            continue
        return _to_record(
            config, split, index, attempt, rng, is_video, background_kind, shapes, frames, visible, chosen, digest
        )
    raise RuntimeError(
        f"synthetic sample {split}/{index}: no valid scene in {_MAX_SCENE_ATTEMPTS} attempts; the config "
        f"({config}) leaves too little room for the shapes — use fewer or smaller shapes or a lower "
        "min_visible_fraction"
    )


def _to_record(
    config: SyntheticConfig,
    split: str,
    index: int,
    attempt: int,
    rng: np.random.Generator,
    is_video: bool,
    background_kind: str,
    shapes: list[_Shape],
    frames: np.ndarray,
    visible: np.ndarray,
    chosen: list[tuple[_Query, int]],
    digest: str,
) -> dict:
    prompt = " and ".join(_describe(query, rng) for query, _ in chosen)
    answer = "" if len(chosen) == 1 else " and ".join(["[SEG]"] * len(chosen)) + "."
    targets = [target for _, target in chosen]
    objects = [
        {
            "id": i,
            "shape": shape.shape,
            "color": shape.color,
            "rgb": list(shape.rgb),
            "size": round(shape.size, 3),
            "centers": np.round(shape.centers, 3).tolist(),
            "motion": shape.motion,
            "draw_order": i,
        }
        for i, shape in enumerate(shapes)
    ]
    meta = make_meta(
        split=split,
        index=index,
        seed=config.seed,
        attempt=attempt,
        image_size=config.image_size,
        num_frames=int(frames.shape[0]),
        background=background_kind,
        position_margin=config.position_margin,
        objects=objects,
        targets=targets,
        queries=[asdict(query) for query, _ in chosen],
        prompt_kinds=[query.kind for query, _ in chosen],
    )
    return {
        "sample_id": f"synthetic/{split}/{index:06d}",
        "source": "synthetic",
        "media_type": "video" if is_video else "image",
        "media_id": f"synthetic/{digest[:20]}",
        "frames": [{"bytes": _encode_png(frame), "path": None} for frame in frames],
        "prompt": prompt,
        "answer": answer,
        "masks": _masks_column_value([[encode_rle(mask) for mask in visible[target]] for target in targets]),
        "meta": meta,
    }


def _masks_column_value(per_object: list[list[dict]]) -> list:
    """Lay out ``per_object[k][t]`` (one RLE dict per object and frame) the way ``RECORD_FEATURES["masks"]``
    stores it.

    ``datasets`` turns a ``Sequence`` of a dict into a dict of lists, so with ``Sequence(Sequence(RLE_FEATURE))``
    each object is ``{"size": [size per frame], "counts": [counts per frame]}``; with a ``List(List(...))`` schema
    each object is a list of RLE dicts. Both layouts are handled so the generator follows the schema as defined.
    """
    if isinstance(RECORD_FEATURES["masks"].feature, dict):
        keys = list(RECORD_FEATURES["masks"].feature)
        return [{key: [rle[key] for rle in frames] for key in keys} for frames in per_object]
    return per_object


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown synthetic split {split!r}; use one of {list(SPLITS)}")


def generate_synthetic(
    num_samples: int, config: SyntheticConfig | None = None, split: str = "train", show_progress: bool = True
) -> datasets.Dataset:
    """Generate ``num_samples`` synthetic referring samples of ``split``.

    Args:
        num_samples: number of records (≥ 1).
        config: scene settings; :class:`SyntheticConfig` defaults when ``None``.
        split: ``"train"``, ``"validation"`` or ``"test"``; selects the seeds and the pixel-hash buckets a scene
            must fall in, so that the splits never share an image or clip.
        show_progress: show a tqdm progress bar.

    Returns:
        A ``datasets.Dataset`` with features :data:`RECORD_FEATURES`. Images have one frame and videos
        ``config.num_frames`` frames of ``(image_size, image_size)`` RGB, stored as PNG bytes; ``masks[k][t]`` is
        the RLE of the visible part of the ``k``-th referred object in frame ``t``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"generate_synthetic: num_samples={num_samples!r} must be a positive integer")
    config = config if config is not None else SyntheticConfig()
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"generate_synthetic: config must be a SyntheticConfig, got {type(config).__name__}")
    _check_split(split)
    records = [
        _make_record(config, split, index)
        for index in tqdm(range(int(num_samples)), desc=f"synthetic {split}", disable=not show_progress)
    ]
    columns = {name: [record[name] for record in records] for name in RECORD_FEATURES}
    return datasets.Dataset.from_dict(columns, features=RECORD_FEATURES)


def _sample_keys(dataset: datasets.Dataset) -> tuple[set[bytes], set[tuple[bytes, str]]]:
    """Fingerprints of the frames of every record and of every (frames, prompt) pair."""
    media: set[bytes] = set()
    pairs: set[tuple[bytes, str]] = set()
    frames_column = dataset.cast_column("frames", datasets.Sequence(datasets.Image(decode=False)))
    for frames, prompt in zip(frames_column["frames"], dataset["prompt"]):
        digest = hashlib.sha256(b"".join(hashlib.sha256(frame["bytes"]).digest() for frame in frames)).digest()
        media.add(digest)
        pairs.add((digest, prompt))
    return media, pairs


def assert_disjoint(first: datasets.Dataset, second: datasets.Dataset, same_media_allowed: bool = False) -> None:
    """Raise ``ValueError`` when two datasets share a sample: identical frame bytes and prompt (or, unless
    ``same_media_allowed``, identical frame bytes at all)."""
    first_media, first_pairs = _sample_keys(first)
    second_media, second_pairs = _sample_keys(second)
    shared_pairs = first_pairs & second_pairs
    if shared_pairs:
        raise ValueError(
            f"the datasets share {len(shared_pairs)} samples (identical frames and prompt, e.g. "
            f"{next(iter(shared_pairs))[1]!r}); regenerate one split with a different split name or seed"
        )
    shared_media = first_media & second_media
    if shared_media and not same_media_allowed:
        raise ValueError(
            f"the datasets share {len(shared_media)} images/clips (identical frame bytes); "
            "regenerate one split with a different split name or seed"
        )


@functools.lru_cache(maxsize=8)
def _generate_cached(split: str, num_samples: int, config: SyntheticConfig) -> datasets.Dataset:
    return generate_synthetic(num_samples, config, split)


def load_synthetic(
    split: str = "train",
    num_samples: int | None = None,
    config: SyntheticConfig | None = None,
    check_train_samples: int | None = None,
) -> datasets.Dataset:
    """The synthetic dataset of ``split`` (``"train"``, ``"validation"`` or ``"test"``).

    Args:
        split: which split; each has its own seeds and pixel-hash buckets, so the splits never share an image.
        num_samples: number of records; :data:`DEFAULT_SPLIT_SIZES` of the split when ``None``.
        config: scene settings; :class:`SyntheticConfig` defaults when ``None``.
        check_train_samples: for a held-out split, the size of the training split (same config) it is verified
            against — no shared image or clip, no shared (frames, prompt) pair — before it is returned;
            ``DEFAULT_SPLIT_SIZES["train"]`` when ``None``, ``0`` to skip the check. Ignored for ``"train"``.

    The same arguments always give the same records; results are cached in memory for the process.
    """
    _check_split(split)
    config = config if config is not None else SyntheticConfig()
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"load_synthetic: config must be a SyntheticConfig, got {type(config).__name__}")
    num_samples = DEFAULT_SPLIT_SIZES[split] if num_samples is None else num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"load_synthetic: num_samples={num_samples!r} must be a positive integer")
    check_train_samples = DEFAULT_SPLIT_SIZES["train"] if check_train_samples is None else check_train_samples
    if not isinstance(check_train_samples, (int, np.integer)) or check_train_samples < 0:
        raise ValueError(
            f"load_synthetic: check_train_samples={check_train_samples!r} must be a non-negative integer (0 skips)"
        )
    dataset = _generate_cached(split, int(num_samples), config)
    if split != "train" and check_train_samples > 0:
        # The hash buckets make a shared sample impossible by construction; this verifies it.
        assert_disjoint(_generate_cached("train", int(check_train_samples), config), dataset)
    return dataset


def shuffled_prompts(dataset: datasets.Dataset, seed: int = 0) -> datasets.Dataset:
    """A copy of ``dataset`` whose prompts and answers are moved to other samples; frames and masks stay.

    This is the control for whether a model reads the text. Prompts move only between records with the same
    media type and the same number of referred objects (so the answer's ``[SEG]`` count still matches the masks),
    and within each such group the permutation has no fixed point (a random cyclic shift of a random order), so no
    record keeps its own prompt when its group has two or more records. ``meta`` gains ``shuffled_from``: the
    ``sample_id`` whose prompt the record now carries (``None`` when its group had a single record).
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"shuffled_prompts expects a datasets.Dataset, got {type(dataset).__name__}")
    required = ("prompt", "answer", "masks", "media_type", "meta", "sample_id")
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(f"shuffled_prompts: the dataset lacks the columns {missing}; it must follow RECORD_FEATURES")
    rng = np.random.default_rng(seed)
    prompts, answers = dataset["prompt"], dataset["answer"]
    sample_ids = dataset["sample_id"]
    groups: dict[tuple[str, int], list[int]] = {}
    for row, (media_type, masks) in enumerate(zip(dataset["media_type"], dataset["masks"])):
        groups.setdefault((media_type, len(masks)), []).append(row)
    source_of = list(range(len(dataset)))
    for rows in groups.values():
        if len(rows) < 2:
            continue
        order = [rows[i] for i in rng.permutation(len(rows))]
        for position, row in enumerate(order):
            source_of[row] = order[(position + 1) % len(order)]

    metas = []
    for row, meta in enumerate(dataset["meta"]):
        fields = json.loads(meta) if meta else {}
        fields["shuffled_from"] = sample_ids[source_of[row]] if source_of[row] != row else None
        metas.append(json.dumps(fields, sort_keys=True))
    shuffled = dataset.remove_columns(["prompt", "answer", "meta"])
    shuffled = shuffled.add_column("prompt", [prompts[source] for source in source_of])
    shuffled = shuffled.add_column("answer", [answers[source] for source in source_of])
    shuffled = shuffled.add_column("meta", metas)
    shuffled = shuffled.select_columns(list(dataset.column_names))
    if shuffled.features != dataset.features:
        shuffled = shuffled.cast(dataset.features)
    return shuffled
