"""An offline DAVIS 2017 stand-in: short low-resolution videos in the DAVIS layout.

Each video is a textured background with two textured shapes (a checkered square and a striped
disc) moving in straight lines at different speeds, the disc passing over the square (an
occlusion), written as JPEG frames and palette PNG masks (0 background, 1 square, 2 disc, the
disc drawn last); `void_frames` adds a void (255) band along the square's top edge in those
frames, as DAVIS marks uncertain pixels.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from stop_jax.eval import davis_data


def _texture(rng, h, w, colours):
  """A random stripe/checker texture in `colours` (float [h, w, 3] in 0..255)."""
  period = rng.integers(3, 7)
  yy, xx = np.mgrid[:h, :w]
  if rng.random() < 0.5:
    pattern = ((yy // period + xx // period) % 2).astype(int)
  else:
    pattern = ((xx + yy) // period % 2).astype(int)
  return np.asarray(colours, np.float32)[pattern]


def make_video(rng, frames: int, size: tuple[int, int], void_frames=()):
  """(uint8 frames [T, H, W, 3], uint8 masks [T, H, W])."""
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  background = _texture(rng, h, w, [[40, 90, 40], [70, 130, 60]])  # grass-like
  background += rng.normal(0, 6, (h, w, 3))
  square_tex = _texture(rng, h, w, [[200, 40, 40], [250, 210, 60]])
  disc_tex = _texture(rng, h, w, [[40, 60, 210], [230, 230, 240]])
  side, radius = h // 3, h // 5
  # The square moves right, the disc left along the same rows: they meet after ~3 frames.
  sq0 = np.array([h / 2 - side / 2 + rng.integers(-3, 4), 2.0])  # (top, left)
  sq_v = np.array([rng.uniform(-0.5, 0.5), rng.uniform(2.5, 3.5)])
  dc0 = np.array([h / 2, w - radius - 2.0])  # centre
  dc_v = np.array([rng.uniform(-0.5, 0.5), -rng.uniform(4.0, 5.0)])
  images = np.empty((frames, h, w, 3), np.uint8)
  masks = np.zeros((frames, h, w), np.uint8)
  for t in range(frames):
    top, left = np.round(sq0 + t * sq_v).astype(int)
    top = int(np.clip(top, 0, h - side))
    square = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
    cy, cx = dc0 + t * dc_v
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    img = background.copy()
    img[square] = square_tex[square]
    img[disc] = disc_tex[disc]
    masks[t][square] = 1
    masks[t][disc] = 2
    if t in void_frames:
      masks[t][(yy >= top - 1) & (yy <= top) & (xx >= left) & (xx < left + side)] = 255
    images[t] = np.clip(img, 0, 255).astype(np.uint8)
  return images, masks


def make_davis(
  root: str,
  names=('slide', 'cross', 'pass'),
  frames: int = 8,
  size: tuple[int, int] = (48, 64),
  seed: int = 0,
  void_frames=(2,),
) -> dict[str, np.ndarray]:
  """Writes the videos under root in the DAVIS 2017 layout; returns {name: masks [T, H, W]}."""
  rng = np.random.default_rng(seed)
  palette = davis_data.default_palette()
  os.makedirs(os.path.join(root, 'ImageSets', '2017'), exist_ok=True)
  with open(os.path.join(root, 'ImageSets', '2017', 'val.txt'), 'w') as f:
    f.write('\n'.join(names) + '\n')
  out = {}
  for name in names:
    images, masks = make_video(rng, frames, size, void_frames)
    frame_dir = os.path.join(root, 'JPEGImages', '480p', name)
    mask_dir = os.path.join(root, 'Annotations', '480p', name)
    os.makedirs(frame_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for t in range(frames):
      Image.fromarray(images[t]).save(os.path.join(frame_dir, f'{t:05d}.jpg'), quality=95)
      davis_data.write_mask(os.path.join(mask_dir, f'{t:05d}.png'), masks[t], palette)
    out[name] = masks
  return out
