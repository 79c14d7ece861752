"""DAVIS 2017 on disk: the sequences of a split, frames at the protocol's size, palette masks.

The layout users download from davischallenge.org (DAVIS-2017-trainval-480p.zip):

  ROOT/ImageSets/2017/val.txt            one sequence name per line
  ROOT/JPEGImages/480p/<seq>/00000.jpg   every frame
  ROOT/Annotations/480p/<seq>/00000.png  palette PNG: 0 background, 1..K objects, 255 void

Results are written in the layout the davis2017 evaluation code reads: DIR/<seq>/<frame>.png,
palette PNGs named after the frames. Every read and write goes through `runtime/fileio.py`, so
the root and the results may be local or in a bucket.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from stop_jax.data import augment
from stop_jax.runtime import fileio

VOID = 255

LAYOUT = (
  'ROOT/ImageSets/2017/<split>.txt (sequence names), ROOT/JPEGImages/<resolution>/<seq>/*.jpg, '
  'ROOT/Annotations/<resolution>/<seq>/*.png (palette masks); download DAVIS-2017-trainval-480p '
  'from https://davischallenge.org/davis2017/code.html'
)


@dataclasses.dataclass(frozen=True)
class Video:
  """One sequence: its frames and ground-truth masks (paths, sorted by frame name)."""

  name: str
  frames: tuple[str, ...]
  masks: tuple[str, ...]


def _missing(what: str, path: str) -> FileNotFoundError:
  return FileNotFoundError(f'DAVIS {what} not found: {path}. Expected layout: {LAYOUT}.')


def list_videos(
  root: str, split: str = 'val', resolution: str = '480p', names: Sequence[str] = ()
) -> list[Video]:
  """The videos of ROOT/ImageSets/2017/<split>.txt (or just `names`), checked against the layout.

  Every video needs at least one frame and a mask for each frame (the first one is the
  propagation's input; the others are the ground truth of the scores).
  """
  if not root:
    raise _missing('root (config.eval.data_dir is empty)', '<unset>')
  listing = os.path.join(root, 'ImageSets', '2017', f'{split}.txt')
  if not fileio.exists(listing):
    raise _missing(f'split list for split={split!r}', listing)
  available = [n.strip() for n in fileio.read_text(listing).splitlines() if n.strip()]
  unknown = sorted(set(names) - set(available))
  if unknown:
    raise ValueError(f'config.eval.davis_sequences: {unknown} are not in {listing}.')
  videos = []
  for name in names or available:
    frame_dir = os.path.join(root, 'JPEGImages', resolution, name)
    mask_dir = os.path.join(root, 'Annotations', resolution, name)
    for what, d in (('frames', frame_dir), ('annotations', mask_dir)):
      if not fileio.isdir(d):
        raise _missing(f'{what} of sequence {name!r}', d)
    frames = sorted(f for f in fileio.listdir(frame_dir) if f.endswith('.jpg'))
    masks = {f for f in fileio.listdir(mask_dir) if f.endswith('.png')}
    if not frames:
      raise _missing(f'frames (*.jpg) of sequence {name!r}', frame_dir)
    lacking = [f for f in frames if _png(f) not in masks]
    if lacking:
      raise _missing(
        f'annotations of {len(lacking)} frames of {name!r} (first: {lacking[0]})', mask_dir
      )
    videos.append(
      Video(
        name,
        tuple(os.path.join(frame_dir, f) for f in frames),
        tuple(os.path.join(mask_dir, _png(f)) for f in frames),
      )
    )
  return videos


def _png(frame_file: str) -> str:
  return os.path.splitext(os.path.basename(frame_file))[0] + '.png'


def frame_size(
  height: int, width: int, short_side: int, long_multiple: int, patch: int
) -> tuple[int, int]:
  """(H, W) a frame is resized to: shorter side `short_side`, longer side scaled with it and
  floored to a multiple of `long_multiple` (DINO's reader: 480x854 -> 480x832), then both
  floored to a multiple of the patch size (so the encoder sees every pixel)."""
  if height <= width:
    h, w = short_side, int(short_side * width / height) // long_multiple * long_multiple
  else:
    h, w = int(short_side * height / width) // long_multiple * long_multiple, short_side
  h, w = h // patch * patch, w // patch * patch
  if h < patch or w < patch:
    raise ValueError(
      f'a {height}x{width} frame resized with davis_short_side={short_side}, '
      f'davis_long_multiple={long_multiple} is smaller than one patch of {patch}.'
    )
  return h, w


def _open(path: str) -> Image.Image:
  image = Image.open(io.BytesIO(fileio.read_bytes(path)))
  image.load()
  return image


def read_frames(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
  """RGB frames resized (bilinear) to size (H, W), ImageNet-normalised: float32 [T, H, W, 3]."""
  h, w = size
  out = np.empty((len(paths), h, w, 3), np.float32)
  for i, path in enumerate(paths):
    image = _open(path).convert('RGB').resize((w, h), Image.Resampling.BILINEAR)
    out[i] = np.asarray(image, np.float32) / 255.0
  return (out - np.asarray(augment.MEAN_RGB, np.float32)) / np.asarray(augment.STD_RGB, np.float32)


def read_mask(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(uint8 labels [H, W], its palette [256, 3] uint8 or None) of a palette PNG."""
  image = _open(path)
  if image.mode not in ('P', 'L'):
    raise ValueError(f'{path}: a DAVIS mask is a palette (mode P) PNG, this one is {image.mode}.')
  palette = image.getpalette() if image.mode == 'P' else None
  if palette is not None:
    palette = np.asarray(palette + [0] * (768 - len(palette)), np.uint8).reshape(256, 3)
  return np.asarray(image, np.uint8), palette


def read_masks(paths: Sequence[str]) -> np.ndarray:
  """uint8 [T, H, W] labels of a video's masks."""
  return np.stack([read_mask(p)[0] for p in paths])


def default_palette() -> np.ndarray:
  """The PASCAL VOC colour map that DAVIS masks use: [256, 3] uint8 (index 1 red, 2 green...)."""
  palette = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for bit in range(8):
      r |= ((c >> 0) & 1) << (7 - bit)
      g |= ((c >> 1) & 1) << (7 - bit)
      b |= ((c >> 2) & 1) << (7 - bit)
      c >>= 3
    palette[i] = (r, g, b)
  return palette


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of [H, W] labels to size (h, w), pixel centres aligned (PIL's
  NEAREST: output pixel i reads input pixel floor((i + 0.5) * H / h))."""
  h, w = size
  rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(int), labels.shape[0] - 1)
  cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(int), labels.shape[1] - 1)
  return labels[rows[:, None], cols[None, :]]


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int], num_labels: int) -> np.ndarray:
  """The first frame's one-hot labels at feature resolution: float32 [h * w, num_labels].

  The mask is resized to the token grid by nearest neighbour (DINO's reader); void (255) counts
  as background, as in the davis2017 reader.
  """
  small = resize_nearest(np.where(mask == VOID, 0, mask), grid).reshape(-1)
  if small.max(initial=0) >= num_labels:
    raise ValueError(f'label {small.max()} >= num_labels={num_labels}.')
  return np.eye(num_labels, dtype=np.float32)[small]


def write_mask(path: str, labels: np.ndarray, palette: np.ndarray):
  """Writes uint8 labels [H, W] as a palette PNG (atomically, `fileio.write_bytes`)."""
  image = Image.fromarray(np.asarray(labels, np.uint8))  # mode L; putpalette makes it P
  image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  fileio.write_bytes(path, buffer.getvalue())
