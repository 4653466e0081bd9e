"""The procedural video set and the mp4-folder reader (dit_sparse.data), on CPU."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.data import (
    VOCABULARY,
    ProceduralVideoDataset,
    PromptAttributes,
    VideoFolderDataset,
    VideoSpec,
    compose_prompt,
    model_input_to_video,
    parse_prompt,
    render_videos,
    sample_spec,
    video_to_model_input,
)
from dit_sparse.data.vocabulary import COLORS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_specs_are_deterministic_per_seed_and_index():
    assert sample_spec(3, 17) == sample_spec(3, 17)
    assert len({sample_spec(3, i) for i in range(20)}) == 20
    assert sample_spec(3, 0) != sample_spec(4, 0)


def test_dataset_items_are_deterministic_uint8_videos():
    ds = ProceduralVideoDataset(length=5, seed=1, frames=5, height=24, width=40)
    video, prompt = ds[2]
    again, prompt_again = ProceduralVideoDataset(length=5, seed=1, frames=5, height=24, width=40)[2]
    assert video.shape == (5, 24, 40, 3) and video.dtype == torch.uint8
    assert torch.equal(video, again) and prompt == prompt_again == ds.spec(2).prompt
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds[5]


@settings(max_examples=12, deadline=None)
@given(
    frames=st.integers(1, 6),
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    index=st.integers(0, 10_000),
)
def test_render_shapes_and_range(frames, height, width, index):
    specs = [sample_spec(0, index), sample_spec(0, index + 1)]
    video = render_videos(specs, frames, height, width)
    assert video.shape == (2, frames, height, width, 3) and video.dtype == torch.float32
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0


def test_prompts_parse_back_into_the_vocabulary():
    vocab = set(VOCABULARY)
    for i in range(300):
        spec = sample_spec(7, i)
        words = spec.prompt.split()
        assert set(words) <= vocab, spec.prompt
        assert parse_prompt(spec.prompt) == spec.attrs
        assert compose_prompt(parse_prompt(spec.prompt)) == spec.prompt
        assert spec.attrs.background not in (spec.attrs.color, spec.attrs.target_color)
    assert parse_prompt("A Red circle moving left on a blue background.") == PromptAttributes(
        "red", "circle", "moving left", "blue"
    )
    assert len(set(VOCABULARY)) == len(VOCABULARY)


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("a red elephant moving left on a blue background", "elephant"),
        ("a red circle moving sideways on a blue background", "sideways"),
        ("a red circle bouncing on a blue", "ends too early"),
        ("a red circle bouncing on a blue background today", "today"),
    ],
)
def test_parse_prompt_names_the_bad_word(prompt, word):
    with pytest.raises(ValueError, match=word):
        parse_prompt(prompt)


def _spec(motion, target=None, **kw):
    attrs = PromptAttributes("red", "square", motion, "blue", None, target)
    return VideoSpec(attrs, **{"size": 0.12, "x0": 0.5, "y0": 0.5, **kw})


def _object_mask(frame, color):
    return (np.abs(frame - np.asarray(COLORS[color])).sum(-1) < 0.05)


def test_rendered_videos_show_what_the_prompt_says():
    left = _spec("moving left", x0=0.75, travel=0.5)
    grow = _spec("growing", size=0.05, growth=2.5)
    turn = _spec("turning", target="yellow")
    bounce = _spec("bouncing", y0=0.75, travel=0.4, bounces=1.0)
    videos = render_videos([left, grow, turn, bounce], frames=9, height=64, width=64).numpy()

    xs = [np.nonzero(_object_mask(f, "red"))[1].mean() for f in videos[0]]
    assert all(b < a for a, b in zip(xs, xs[1:])), "a shape moving left must move left"
    corner = videos[0, 0, 0, 0]
    np.testing.assert_allclose(corner, COLORS["blue"], atol=1e-6)

    areas = [_object_mask(f, "red").sum() for f in videos[1]]
    assert all(b >= a for a, b in zip(areas, areas[1:])) and areas[-1] > 4 * areas[0], "a growing shape must grow"

    centre = videos[2][:, 32, 32]
    np.testing.assert_allclose(centre[0], COLORS["red"], atol=1e-6)
    np.testing.assert_allclose(centre[-1], COLORS["yellow"], atol=1e-6)

    ys = [np.nonzero(_object_mask(f, "red"))[0].mean() for f in videos[3]]
    assert min(ys) < ys[0] - 15 and abs(ys[-1] - ys[0]) < 3, "one bounce goes up and comes back down"


def test_textures_differ_from_plain_backgrounds():
    textures = (None, "striped", "checkered", "dotted")
    specs = [VideoSpec(PromptAttributes("red", "circle", "growing", "green", t), 0.01, 0.5, 0.5) for t in textures]
    frames = render_videos(specs, frames=1, height=48, width=48)[:, 0]
    plain = frames[0]
    assert float((plain - plain[0, 0]).abs().max()) < 0.2  # only the tiny shape differs
    for i in range(1, 4):
        assert float(frames[i].std()) > 0.05
        assert not torch.allclose(frames[i], frames[1 if i != 1 else 2])


def test_model_input_round_trip():
    video, _ = ProceduralVideoDataset(length=1, frames=3, height=8, width=16)[0]
    x = video_to_model_input(video)
    assert x.shape == (1, 3, 3, 8, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(model_input_to_video(x)[0], video)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        video_to_model_input(torch.zeros(3, 8, 8))


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="non-negative"):
        sample_spec(-1, 0)
    with pytest.raises(ValueError, match="frames"):
        render_videos([sample_spec(0, 0)], 0, 8, 8)
    with pytest.raises(ValueError, match="VideoSpec"):
        render_videos([], 1, 8, 8)
    with pytest.raises(ValueError, match="height"):
        ProceduralVideoDataset(height=0)


def _write_mp4(path, frames):
    import imageio

    with imageio.get_writer(str(path), fps=8, codec="libx264", macro_block_size=1, ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(f)


def test_video_folder_reads_videos_and_captions(tmp_path):
    frames = [np.full((16, 24, 3), 40 * i, dtype=np.uint8) for i in range(6)]
    _write_mp4(tmp_path / "a.mp4", frames)
    _write_mp4(tmp_path / "b.mp4", frames[:4])
    (tmp_path / "a.txt").write_text("a red circle moving left on a blue background\n")
    (tmp_path / "captions.json").write_text(json.dumps({"b.mp4": "from the json", "a.mp4": "loses to the sidecar"}))

    ds = VideoFolderDataset(tmp_path)
    assert len(ds) == 2
    video, caption = ds[0]
    assert caption == "a red circle moving left on a blue background"
    assert video.shape == (6, 16, 24, 3) and video.dtype == torch.uint8
    assert abs(int(video[3].float().mean()) - 120) <= 4  # lossy codec, but the frame order survives
    assert ds[1][1] == "from the json" and ds[1][0].shape[0] == 4

    small = VideoFolderDataset(tmp_path, frames=4, height=8, width=12)
    assert small[0][0].shape == (4, 8, 12, 3)
    with pytest.raises(ValueError, match="fewer than frames=5"):
        VideoFolderDataset(tmp_path, frames=5)[1]


def test_video_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .mp4"):
        VideoFolderDataset(tmp_path)
    _write_mp4(tmp_path / "clip.mp4", [np.zeros((8, 8, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match="clip.txt"):
        VideoFolderDataset(tmp_path)
    (tmp_path / "clip.txt").write_text("x")
    with pytest.raises(ValueError, match="both height and width"):
        VideoFolderDataset(tmp_path, height=8)
