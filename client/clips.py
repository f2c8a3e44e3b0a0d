"""Video clips to the wire format of video cascades: ``VIDEO`` uint8 [N, F, S, S, 3] RGB.

A clip is either
  a .npy file       uint8 [T, H, W, 3] RGB frames (or [T, H, W] grey), as `np.save` writes them, or
  a frame folder    a folder holding the clip's frames as image files (JPEG, PNG, ...), in name order
                    (what `ffmpeg -i clip.mp4 clip/%04d.jpg` writes).
Each clip is sent as the F frames the served models take: all of them when T == F, else F evenly spaced
ones (frame indices round(linspace(0, T - 1, F)); shorter clips repeat frames). Each frame is made like
a wire image (client/images.py: shorter side to S / crop_pct, centre crop S x S).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from littlebig.errors import UserError

from .images import IMAGE_SUFFIXES, sample_photos, to_wire

CLIP_SUFFIX = ".npy"
ClipLike = str | os.PathLike | np.ndarray


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def is_frame_folder(path: Path) -> bool:
    """A folder that holds image files directly: one clip, its frames in name order."""
    return path.is_dir() and bool(_frame_files(path))


def is_clip(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() == CLIP_SUFFIX) or is_frame_folder(path)


def frame_indices(count: int, frames: int) -> np.ndarray:
    """Which of a clip's ``count`` frames are sent: all when there are ``frames``, else evenly spaced ones."""
    if count < 1:
        raise UserError("a clip needs at least one frame")
    return np.round(np.linspace(0, count - 1, frames)).astype(int)


def _array_frames(clip: np.ndarray, where: str) -> np.ndarray:
    if clip.dtype != np.uint8 or clip.ndim not in (3, 4) or (clip.ndim == 4 and clip.shape[3] not in (1, 3, 4)):
        raise UserError(f"{where} must hold uint8 frames [T, H, W, 3] (or [T, H, W]), got {clip.dtype} {list(clip.shape)}")
    return clip


def _npy_frames(path: Path) -> np.ndarray:
    try:
        clip = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: only the frames sent are read
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read clip {path}: {err}") from None
    return _array_frames(clip, f"clip {path}")


def to_wire_clip(clip: ClipLike, frames: int, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """One clip (a .npy path, a frame folder or a uint8 [T, H, W, 3] array) as uint8 [frames, size, size, 3]."""
    if isinstance(clip, np.ndarray):
        source = _array_frames(clip, "a clip array")
    else:
        path = Path(clip)
        if path.is_dir():
            source = _frame_files(path)
            if not source:
                raise UserError(f"clip folder {path} holds no frames (.jpg, .png, ...)")
        elif path.is_file() and path.suffix.lower() == CLIP_SUFFIX:
            source = _npy_frames(path)
        else:
            raise UserError(f"clip {path} is neither a .npy file nor a folder of frames")
    # Frame files are decoded, and .npy frames read, only for the frames sent.
    chosen = [source[i] if isinstance(source, list) else np.asarray(source[i]) for i in frame_indices(len(source), frames)]
    return np.stack([to_wire(frame, size, crop_pct) for frame in chosen])


def to_wire_clips(clips: Sequence[ClipLike], frames: int, size: int | None, crop_pct: float = 0.875) -> np.ndarray:
    """Clips as one VIDEO batch uint8 [N, frames, size, size, 3]."""
    if size is None or frames < 1:
        raise UserError("the served models take no clips (their gate states no frames and wire size)")
    if len(clips) == 0:
        return np.zeros((0, frames, size, size, 3), np.uint8)
    return np.stack([to_wire_clip(clip, frames, size, crop_pct) for clip in clips])


def list_clips(folder: str | os.PathLike) -> list[Path]:
    """The clips under ``folder`` (itself, when it is a frame folder), sorted: .npy files and frame folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"clip folder {folder} does not exist")
    if is_frame_folder(folder):
        return [folder]
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            found += list_clips(path)
        elif path.suffix.lower() == CLIP_SUFFIX and path.is_file():
            found.append(path)
    return sorted(found)


def sample_clips(frames: int, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """Clips made of real photographs (scikit-image's), each a slow diagonal pan across one photo:
    uint8 [N, frames, size, size, 3], for parity checks."""
    clips = []
    for photo in sample_photos().values():
        base = to_wire(photo, size + 2 * frames, crop_pct)
        clips.append(np.stack([base[f : f + size, 2 * f : 2 * f + size] for f in range(frames)]))
    return np.stack(clips)
