"""Synthetic demo dataset: a small ImageFolder of real JPEGs with learnable classes.

The demo config trains a narrow AlexNet on a 2-core CPU in a few minutes without
downloading anything. This module draws that data once into a cache folder:
eight shape/pattern classes (circle, ring, square, triangle, ...) on noisy
gradient backgrounds, with fill and background colours drawn independently of
the class, so a network has to look at shape to do better than chance.

Usage::

    from alexnet_train.data.demo import ensure_demo_dataset
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = ensure_demo_dataset()          # generates on first call only
    train_set = ImageFolder(train_dir)                  # 8 classes x 500 images
    val_set = ImageFolder(val_dir)                      # 8 classes x 50 images

The tree lives in ``<cache>/demo-v<DEMO_VERSION>/{train,val}/<class>/<class>_<NNNN>.JPEG``
where ``<cache>`` is ``$ALEXNET_TRAIN_CACHE``, else ``$XDG_CACHE_HOME/alexnet-train``,
else ``~/.cache/alexnet-train``. A ``COMPLETE`` marker holding the generation
parameters is written last; without it (or with other parameters) the tree is
regenerated. Generation is deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEMO_CLASSES",
    "DEMO_VERSION",
    "default_cache_dir",
    "demo_root",
    "ensure_demo_dataset",
]

DEMO_CLASSES: tuple[str, ...] = (
    "bars_horizontal",
    "bars_vertical",
    "checker",
    "circle",
    "cross",
    "ring",
    "square",
    "triangle",
)

# Bump whenever the drawing code changes what gets written, so old caches are ignored.
DEMO_VERSION: int = 1

_MARKER = "COMPLETE"
_JPEG_QUALITY = 90
# Shapes are drawn at 2x and box-filtered down, which gives anti-aliased edges
# without the cost of a general-purpose resampler.
_SUPERSAMPLE = 2
# Fraction of images that get a 5:4 aspect ratio, to exercise the resize path.
_NON_SQUARE_P = 0.25
_MAX_ROTATION_DEG = 20.0
# Minimum Euclidean RGB distance between fill and background, so the shape is
# always visible even though both colours are random.
_MIN_CONTRAST = 90.0
# Stale temp folders are only removed when their owner pid is gone *and* they are
# this old, in case the cache is shared with another host whose pids we can't see.
_STALE_TMP_AGE_S = 600.0

PathLike = Union[str, "os.PathLike[str]"]
LogFn = Optional[Callable[[str], object]]


def default_cache_dir() -> pathlib.Path:
    """$ALEXNET_TRAIN_CACHE if set, else $XDG_CACHE_HOME/alexnet-train, else ~/.cache/alexnet-train."""
    explicit = os.environ.get("ALEXNET_TRAIN_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / "alexnet-train"
    return pathlib.Path.home() / ".cache" / "alexnet-train"


def demo_root(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
    """<cache_dir or default_cache_dir()>/demo-v<DEMO_VERSION>"""
    base = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"demo-v{DEMO_VERSION}"


def ensure_demo_dataset(
    cache_dir: Optional[PathLike] = None,
    *,
    train_per_class: int = 500,
    val_per_class: int = 50,
    size: int = 96,
    seed: int = 0,
    log: LogFn = print,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Return (train_dir, val_dir) under demo_root(cache_dir), generating the tree once.

    Raises ValueError for nonsensical counts/sizes and OSError (naming the path)
    when the cache folder cannot be created or written.
    """
    _check_demo_args(train_per_class, val_per_class, size, seed)
    say = log if log is not None else (lambda _msg: None)

    root = demo_root(cache_dir)
    train_dir, val_dir = root / "train", root / "val"
    params = {
        "version": DEMO_VERSION,
        "classes": list(DEMO_CLASSES),
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }

    if _marker_matches(root, params):
        say(f"demo data: using {root}")
        return train_dir, val_dir

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(f"cannot create demo data cache directory {root.parent}", exc) from exc

    _remove_stale_tmp(root)
    tmp, count = _generate_beside(root, params)
    if not _move_into_place(tmp, root, params):
        say(f"demo data: using {root}")
        return train_dir, val_dir

    say(f"demo data: generated {count} JPEGs ({len(DEMO_CLASSES)} classes) into {root}")
    return train_dir, val_dir


def _check_demo_args(train_per_class: int, val_per_class: int, size: int, seed: int) -> None:
    """Raise ValueError for a count, size or seed that cannot make a usable tree."""
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        # ImageFolder refuses empty class folders, so every split needs one image per class.
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _generate_beside(root: pathlib.Path, params: dict) -> tuple[pathlib.Path, int]:
    """Draw the whole tree, marker last, into ``<root>.tmp-<pid>``; returns (that folder, image count).

    Leaves nothing behind when it fails.
    """
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        count = _generate_tree(tmp, params)
        _write_marker(tmp, dict(params, images=count))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_error(f"cannot write demo data into {tmp}", exc) from exc
    except BaseException:
        # Ctrl-C or a bug mid-generation: leave no half tree behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, count


def _move_into_place(tmp: pathlib.Path, root: pathlib.Path, params: dict) -> bool:
    """Rename the finished ``tmp`` to ``root``; returns True, or False (``tmp`` deleted) when
    another process put a tree of the same parameters there first.
    """
    # Another process may have finished the same job while we were drawing.
    if _marker_matches(root, params):
        shutil.rmtree(tmp, ignore_errors=True)
        return False

    try:
        _move_aside(root)
        os.replace(tmp, root)
    except OSError as exc:
        if _marker_matches(root, params):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_error(f"cannot move demo data into place at {root}", exc) from exc
    return True


def _cache_error(message: str, exc: OSError) -> OSError:
    detail = exc.strerror or str(exc)
    if exc.errno is None:
        return OSError(f"{message}: {detail}")
    return OSError(exc.errno, f"{message}: {detail}")


def _marker_matches(root: pathlib.Path, params: dict) -> bool:
    try:
        stored = json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict):
        return False
    return all(stored.get(key) == value for key, value in params.items())


def _write_marker(root: pathlib.Path, params: dict) -> None:
    (root / _MARKER).write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")


def _move_aside(root: pathlib.Path) -> None:
    """Delete an incomplete or outdated tree, renaming it first so that nothing
    ever sees a half-deleted folder at the real path."""
    if not root.exists():
        return
    trash = root.parent / f"{root.name}.old-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(root, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        # os.kill on Windows terminates the process; never probe it there.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_tmp(root: pathlib.Path) -> None:
    """Clean up temp folders left by generations that were killed outright."""
    now = time.time()
    for kind in ("tmp", "old"):
        for path in root.parent.glob(f"{root.name}.{kind}-*"):
            pid_text = path.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            if age > _STALE_TMP_AGE_S and not _pid_alive(int(pid_text)):
                shutil.rmtree(path, ignore_errors=True)


def _generate_tree(dest: pathlib.Path, params: dict) -> int:
    seed = params["seed"] & 0xFFFF_FFFF_FFFF_FFFF
    count = 0
    for split_index, (split, per_class) in enumerate(
        (("train", params["train_per_class"]), ("val", params["val_per_class"]))
    ):
        for class_index, name in enumerate(DEMO_CLASSES):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # One independent stream per image: any single file can be
                # regenerated alone and changing a count doesn't shift the others.
                rng = np.random.default_rng([seed, split_index, class_index, i])
                image = _draw_sample(rng, name, params["size"])
                image.save(folder / f"{name}_{i:04d}.JPEG", "JPEG", quality=_JPEG_QUALITY)
                count += 1
    return count


def _draw_sample(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    # Everything except the shape itself is drawn from the same distributions for
    # every class, and before the class-specific part, so colour, aspect and noise
    # carry no information about the label.
    width = height = size
    if rng.random() < _NON_SQUARE_P:
        long_side = int(round(size * 1.25))
        if rng.random() < 0.5:
            width = long_side
        else:
            height = long_side
    background, ends = _background(rng, width, height)
    fill = _fill_colour(rng, ends)
    noise_sigma = rng.uniform(3.0, 14.0)

    mask = _shape_mask(rng, kind, width, height)
    alpha = mask[..., None]
    pixels = background * (1.0 - alpha) + fill[None, None, :] * alpha
    pixels += rng.normal(0.0, noise_sigma, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A linear gradient between two related random colours, in a random direction.

    Returns the (height, width, 3) float image and its two end colours."""
    start = rng.uniform(0, 255, size=3)
    end = np.clip(start + rng.uniform(-70, 70, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return start + (end - start) * t[..., None], np.stack([start, end])


def _fill_colour(rng: np.random.Generator, ends: np.ndarray) -> np.ndarray:
    for _ in range(32):
        fill = rng.uniform(0, 255, size=3)
        if np.min(np.linalg.norm(ends - fill, axis=1)) >= _MIN_CONTRAST:
            return fill
    # Only reached for mid-grey backgrounds; black or white is then always far enough.
    return np.zeros(3) if ends.mean() > 127.5 else np.full(3, 255.0)


def _shape_mask(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """Coverage in [0, 1] of one randomly sized, placed and rotated shape."""
    ss = _SUPERSAMPLE
    extent = rng.uniform(0.30, 0.70) * min(width, height) * ss
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    parts = _shape_parts(rng, kind, extent)

    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    parts = [(poly @ rotation, value) for poly, value in parts]

    # Place the shape so its rotated outline stays fully inside the image.
    points = np.concatenate([poly for poly, _ in parts])
    lo, hi = points.min(axis=0), points.max(axis=0)
    canvas_w, canvas_h = width * ss, height * ss
    cx = rng.uniform(-lo[0] + 1, max(canvas_w - hi[0] - 1, -lo[0] + 1))
    cy = rng.uniform(-lo[1] + 1, max(canvas_h - hi[1] - 1, -lo[1] + 1))

    canvas = Image.new("L", (canvas_w, canvas_h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, value in parts:
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in poly], fill=value)
    small = canvas.reduce(ss)
    return np.asarray(small, dtype=np.float64) / 255.0


def _shape_parts(rng: np.random.Generator, kind: str, extent: float) -> list[tuple[np.ndarray, int]]:
    """Returns the (polygon, value) pairs of one ``kind`` of shape ``extent`` wide, centred on the origin."""
    half = extent / 2.0

    # Shapes are lists of (polygon, value) pairs in shape-centred coordinates;
    # value 0 punches holes (the ring). Circles are polygons too, which keeps
    # rotation, placement and clipping uniform across classes.
    parts: list[tuple[np.ndarray, int]] = []
    if kind == "circle":
        parts.append((_circle(half), 255))
    elif kind == "ring":
        inner = half * rng.uniform(0.45, 0.65)
        parts += [(_circle(half), 255), (_circle(inner), 0)]
    elif kind == "square":
        parts.append((_rect(-half, -half, half, half), 255))
    elif kind == "triangle":
        # Equilateral, pointing up, with its bounding box centred on the origin.
        h = extent * math.sqrt(3) / 2
        parts.append((np.array([[-half, h / 2], [half, h / 2], [0.0, -h / 2]]), 255))
    elif kind == "cross":
        arm = extent * rng.uniform(0.24, 0.38) / 2
        parts += [(_rect(-half, -arm, half, arm), 255), (_rect(-arm, -half, arm, half), 255)]
    elif kind in ("bars_horizontal", "bars_vertical"):
        # Equal bars and gaps; three bars on small shapes keeps each bar >= ~5 px
        # at 96 px, so the pattern survives the demo's downscale to ~80 px.
        n = 3 if extent < 45 * _SUPERSAMPLE else int(rng.integers(3, 5))
        step = extent / (2 * n - 1)
        for b in range(n):
            top = -half + 2 * b * step
            rect = _rect(-half, top, half, top + step)
            if kind == "bars_vertical":
                rect = rect[:, ::-1].copy()
            parts.append((rect, 255))
    elif kind == "checker":
        # 4x4 only: an odd grid's inverse would be a cross, and 4 cells keep each
        # cell >= ~7 px at the smallest size.
        cells = 4
        step = extent / cells
        phase = int(rng.integers(0, 2))
        for r in range(cells):
            for c in range(cells):
                if (r + c) % 2 == phase:
                    x0, y0 = -half + c * step, -half + r * step
                    parts.append((_rect(x0, y0, x0 + step, y0 + step), 255))
    else:
        raise ValueError(f"unknown demo class {kind!r}")

    return parts


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _circle(radius: float, segments: int = 48) -> np.ndarray:
    theta = np.linspace(0.0, 2 * math.pi, segments, endpoint=False)
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
