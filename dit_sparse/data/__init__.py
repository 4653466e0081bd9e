"""Video data sets of dit-sparse (``dit_sparse.data``).

* :class:`ProceduralVideoDataset` - seeded procedural videos (coloured shapes that move, bounce, grow,
  shrink or change colour) with prompts; trains the embedded default model. :func:`render_videos`
  renders batches of :class:`VideoSpec` on any device.
* :class:`VideoFolderDataset` - a folder of mp4 clips with captions, for fine-tuning.
* :data:`VOCABULARY` - every word a procedural prompt can hold; :func:`parse_prompt` reads one back.
* :func:`judge_video` - whether a (generated) video shows what its procedural prompt asks, judged from its
  pixels: shape colour, background colour, motion and shape (:mod:`dit_sparse.data.judge`).

Videos come as ``[F, H, W, 3]`` (uint8 from the data sets, float [0, 1] from :func:`render_videos`);
:func:`video_to_model_input` makes the ``[N, 3, F, H, W]`` in [-1, 1] that diffusers VAEs take.
"""

from .judge import judge_video
from .procedural import HELD_OUT_SPEC_SEED, ProceduralVideoDataset, VideoSpec, held_out_specs, render_videos, sample_spec
from .tensors import model_input_to_video, video_to_model_input
from .video_folder import VideoFolderDataset, read_video
from .vocabulary import VOCABULARY, PromptAttributes, compose_prompt, parse_prompt

__all__ = [
    "HELD_OUT_SPEC_SEED",
    "VOCABULARY",
    "ProceduralVideoDataset",
    "PromptAttributes",
    "VideoFolderDataset",
    "VideoSpec",
    "compose_prompt",
    "held_out_specs",
    "judge_video",
    "model_input_to_video",
    "parse_prompt",
    "read_video",
    "render_videos",
    "sample_spec",
    "video_to_model_input",
]
