"""Writing generated videos to mp4 (H.264 through imageio-ffmpeg), atomically.

The video is encoded into a temporary file in the target's folder and renamed over the target only
when complete, so a failed or interrupted write never leaves a partial file (nor touches an existing one).
"""

from __future__ import annotations

import pathlib

import numpy as np

from dit_sparse._atomic import atomic_file

__all__ = ["write_video"]


def _as_uint8_frame(frame, index: int) -> np.ndarray:
    """A PIL image, or an array ``[H, W, 3]`` (uint8, or float in [0, 1]; ``[H, W]`` grey), as uint8 ``[H, W, 3]``."""
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # PIL.Image
        frame = np.asarray(frame.convert("RGB"))
    elif hasattr(frame, "detach"):  # torch.Tensor
        frame = frame.detach().cpu().numpy()
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"frame {index} has shape {arr.shape}; frames must be [H, W, 3] arrays or PIL images")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    raise ValueError(f"frame {index} has dtype {arr.dtype}; use uint8 (0..255) or float (0..1)")


def write_video(frames, path, fps: int = 16) -> pathlib.Path:
    """Write ``frames`` to the mp4 file ``path`` at ``fps`` frames per second; returns ``path``.

    ``frames``: any iterable of frames - PIL images, or ``[H, W, 3]`` arrays / tensors, uint8 or float in
    [0, 1] - or one array ``[F, H, W, 3]`` (e.g. ``pipe(...).frames[0]``). All frames must have the same
    size, with even height and width (H.264 in yuv420p). Raises ValueError for bad frames or an fps
    that is not positive; nothing is left at ``path`` (or in its folder) when writing fails.
    """
    import imageio

    path = pathlib.Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"write_video writes mp4 files; {path} does not end in .mp4")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist; create it first")
    count, size = 0, None
    with atomic_file(path, parents=False) as tmp:
        writer = imageio.get_writer(
            str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error",
        )
        try:
            for i, frame in enumerate(frames):
                arr = _as_uint8_frame(frame, i)
                if size is None:
                    size = arr.shape[:2]
                    if size[0] % 2 or size[1] % 2:
                        raise ValueError(f"frames are {size[0]}x{size[1]}; H.264 needs an even height and width")
                elif arr.shape[:2] != size:
                    raise ValueError(f"frame {i} is {arr.shape[0]}x{arr.shape[1]} but frame 0 is {size[0]}x{size[1]}")
                writer.append_data(arr)
                count += 1
        finally:
            writer.close()
        if count == 0:
            raise ValueError("no frames to write")
    return path
