"""A folder of captioned mp4 videos as a data set (for fine-tuning on your own clips).

Layout: ``folder/*.mp4``, each captioned by a sidecar ``<name>.txt`` next to it, or by an entry in
``folder/captions.json`` (``{"<name>.mp4": "caption", ...}``; the key may also be the bare ``<name>``).
A sidecar ``.txt`` wins over ``captions.json``. Item ``i`` is ``(video uint8 [F, H, W, 3], caption)``,
the same layout as :class:`dit_sparse.data.ProceduralVideoDataset`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["VideoFolderDataset", "read_video"]


def read_video(path, max_frames: int | None = None) -> torch.Tensor:
    """Decode an mp4 (through imageio's ffmpeg plugin) into uint8 ``[F, H, W, 3]`` (the first ``max_frames``)."""
    import imageio

    frames = []
    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
    except Exception as e:  # imageio raises several types for unreadable files
        raise ValueError(f"could not open video {path}: {e}") from e
    with reader:
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return torch.from_numpy(np.stack(frames))


class VideoFolderDataset(torch.utils.data.Dataset):
    """Captioned mp4 videos of a folder (see the module docstring for the layout).

    ``frames``: keep the first ``frames`` frames (a video with fewer raises ValueError); ``None`` keeps all.
    ``height`` / ``width``: resize (bilinear, antialiased) when given; both or neither.
    """

    def __init__(self, folder, frames: int | None = None, height: int | None = None, width: int | None = None):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"video folder {self.folder} does not exist or is not a folder")
        if (height is None) != (width is None):
            raise ValueError("give both height and width to resize, or neither to keep the size of the videos")
        for name, v in (("frames", frames), ("height", height), ("width", width)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        self.frames, self.height, self.width = frames, height, width
        self.videos = sorted(self.folder.glob("*.mp4"))
        if not self.videos:
            raise ValueError(f"no .mp4 files in {self.folder}")
        self.captions = [self._caption(p) for p in self.videos]

    def _caption(self, video: pathlib.Path) -> str:
        sidecar = video.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        table = self._captions_json()
        for key in (video.name, video.stem):
            if key in table:
                return str(table[key]).strip()
        raise ValueError(
            f"no caption for {video.name}: write {sidecar.name} next to it or add \"{video.name}\" to "
            f"{self.folder / 'captions.json'}"
        )

    def _captions_json(self) -> dict:
        if not hasattr(self, "_table"):
            path = self.folder / "captions.json"
            self._table = {}
            if path.is_file():
                try:
                    self._table = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from e
                if not isinstance(self._table, dict):
                    raise ValueError(f"{path} must hold one JSON object {{\"name.mp4\": \"caption\"}}")
        return self._table

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int):
        path = self.videos[index]
        video = read_video(path, self.frames)
        if self.frames is not None and video.shape[0] < self.frames:
            raise ValueError(f"video {path.name} has {video.shape[0]} frames, fewer than frames={self.frames}")
        if self.height is not None and tuple(video.shape[1:3]) != (self.height, self.width):
            x = video.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
            video = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return video, self.captions[index]
