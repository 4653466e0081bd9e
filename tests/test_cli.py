"""Tests of the ``dit-sparse`` CLI (in-process through ``main([...])``) and ``scripts/quality_report.py``.

The generation tests use the embedded default model at tiny sizes and few steps on CPU.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import dit_sparse.cli as cli
from dit_sparse.cli import main
from dit_sparse.cli import run as cli_run
from dit_sparse.cli.compare import parse_preset_list
from dit_sparse.cli.errors import CLIError
from dit_sparse.cli.outputs import OutputSet, write_json
from dit_sparse.cli.report import clean_for_json
from dit_sparse.cli.side_by_side import side_by_side
from dit_sparse.data.judge import ATTRIBUTES
from dit_sparse.presets import PRESETS

from _scripts import load_script  # tests/ helper

PROMPT = "a red circle moving left on a blue background"  # in the default model's vocabulary
# Tiny generation settings for the embedded default model: fast on a loaded 2-core CPU (guidance 1: no
# classifier-free guidance, so one transformer call per step).
TINY = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def load_default_model_once():
    """Build the default pipeline once for this module: every command still goes through the registry's
    load_pipeline (and its checks), but repeated loads of "default" return the same pipeline object."""
    from dit_sparse.pipelines import registry

    real, cache = registry.load_pipeline, {}

    def cached(model="default", torch_dtype=torch.float32, device="cpu", cpu_offload=False):
        if model != "default":
            return real(model, torch_dtype=torch_dtype, device=device, cpu_offload=cpu_offload)
        key = (torch_dtype, str(device), cpu_offload)
        if key not in cache:
            cache[key] = real(model, torch_dtype=torch_dtype, device=device, cpu_offload=cpu_offload)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "load_pipeline", cached)
        yield


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def fail(*a, **k):
        raise AssertionError("the command loaded a model before rejecting its input")

    monkeypatch.setattr(cli_run, "load", fail)
    for mod in ("generate", "compare", "masks"):
        module = sys.modules[f"dit_sparse.cli.{mod}"]
        if hasattr(module, "load"):
            monkeypatch.setattr(module, "load", fail)


# ============================================================================ no model needed
def test_entry_point_help_subprocess():
    exe = shutil.which("dit-sparse")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "dit_sparse.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("generate", "presets", "compare", "masks"):
        assert command in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_bad_option_is_usage_error(capsys):
    assert main(["generate", "--prompt", "x", "--out", "a.mp4", "--frames", "zero"]) == 2
    assert "not a whole number" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--out", "a.mp4", "--steps", "0"]) == 2


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert name in out
        assert preset.description in out
        if not preset.measured:
            block = out[out.index(preset.description):].split("\n")[1:3]
            assert all("not measured" in line for line in block)


def test_presets_shows_measured_numbers(monkeypatch, capsys):
    import dataclasses

    fast = dataclasses.replace(PRESETS["fast"], measured={"speedup": 2.5, "setting": "H200 Wan480p", "psnr_db": 31.25})
    monkeypatch.setitem(PRESETS, "fast", fast)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "2.50x (H200 Wan480p)" in out and "31.2 dB PSNR" in out


def test_unknown_preset_lists_valid_ones(tmp_path, capsys, no_model):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--preset", "ludicrous", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'ludicrous'" in err
    assert all(name in err for name in PRESETS)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda d: d / "missing" / "v.mp4", "does not exist"),
        (lambda d: (d / "dir.mp4").mkdir() or d / "dir.mp4", "is a folder"),
        (lambda d: d / "v.avi", "must end with .mp4"),
        (lambda d: (d / "file").write_text("x") and d / "file" / "v.mp4", "does not exist"),
    ],
)
def test_unwritable_output_rejected_before_loading(tmp_path, capsys, no_model, make_out, message):
    out = make_out(tmp_path)
    before = _files(tmp_path)
    assert main(["generate", "--prompt", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("dit-sparse: error:")
    assert _files(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_rejected(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["generate", "--prompt", "x", "--out", str(ro / "v.mp4")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_output_suffixes_checked(tmp_path, capsys, no_model):
    out = str(tmp_path / "v.json")
    video = str(tmp_path / "v.mp4")
    assert main(["generate", "--prompt", "x", "--out", video, "--report", video]) == 2
    err = capsys.readouterr().err
    assert "--report" in err and "must end with .json" in err
    assert main(["generate", "--prompt", "x", "--out", out]) == 2
    assert "must end with .mp4" in capsys.readouterr().err


def test_compare_preset_list():
    assert parse_preset_list("fast, dense,fast") == ["dense", "fast"]
    assert parse_preset_list("turbo") == ["dense", "turbo"]
    with pytest.raises(CLIError, match="unknown preset 'nope'"):
        parse_preset_list("fast,nope")
    with pytest.raises(CLIError, match="empty"):
        parse_preset_list(" , ")


def test_compare_out_dir_is_a_file(tmp_path, capsys, no_model):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["compare", "--prompt", "x", "--out-dir", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cuda_asked_without_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--device", "cuda", "--out", str(out)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_finetune_registered_when_module_exists(monkeypatch, capsys):
    calls = []

    def add_parser(subparsers):
        p = subparsers.add_parser("finetune", help="fine-tune")
        p.add_argument("--data")
        p.set_defaults(func=lambda args: calls.append(args.data) or 0)

    fake = types.ModuleType("dit_sparse_fake_finetune")
    fake.__spec__ = importlib.machinery.ModuleSpec("dit_sparse_fake_finetune", None)
    fake.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "dit_sparse_fake_finetune", fake)
    monkeypatch.setattr(cli, "_OPTIONAL_COMMANDS", ("dit_sparse_fake_finetune",))
    assert main(["finetune", "--data", "d"]) == 0 and calls == ["d"]
    # Without the module the CLI still works and has no finetune command.
    monkeypatch.setattr(cli, "_OPTIONAL_COMMANDS", ("dit_sparse_module_that_does_not_exist",))
    assert main(["presets"]) == 0
    assert main(["finetune"]) == 2
    assert "invalid choice: 'finetune'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- helpers
def test_output_set_commits_all_or_nothing(tmp_path):
    target = tmp_path / "new"
    with OutputSet(target) as outs:
        a, b = outs.add("a.json"), outs.add("b.txt")
        outs.check()
        write_json(outs.temp(a), {"x": 1})
        outs.temp(b).write_text("half")
    assert not target.exists()  # never committed: temporaries and the new folder removed

    with OutputSet(target) as outs:
        a, b = outs.add("a.json"), outs.add("b.txt")
        write_json(outs.temp(a), {"x": 1})
        outs.temp(b).write_text("done")
        assert outs.commit() == [a, b]
    assert _files(target) == ["a.json", "b.txt"]
    assert json.loads(a.read_text()) == {"x": 1}


def test_output_set_refuses_undeclared_and_unwritten(tmp_path):
    outs = OutputSet(tmp_path)
    a = outs.add("a.txt")
    with pytest.raises(ValueError, match="not declared"):
        outs.temp(tmp_path / "other.txt")
    with pytest.raises(RuntimeError, match="never written"):
        outs.commit()
    with pytest.raises(CLIError, match="two outputs"):
        outs.add(a)


def test_clean_for_json_is_strict():
    data = {"nan": float("nan"), "inf": math.inf, "t": torch.tensor([1.0, 2.0]), "np": np.float32(0.5),
            "p": pathlib.Path("/x"), "nested": [{"d": torch.float16}], 3: (1, 2)}
    out = clean_for_json(data)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == {"nan": None, "inf": None, "t": [1.0, 2.0], "np": 0.5, "p": "/x",
                                "nested": [{"d": "torch.float16"}], "3": [1, 2]}


def test_side_by_side_layout():
    a = np.zeros((3, 32, 48, 3), dtype=np.float32)
    b = np.ones((3, 32, 48, 3), dtype=np.float32)
    out = side_by_side([a, b], ["dense", "fast 30 dB"])
    assert out.dtype == np.uint8 and out.shape[0] == 3
    assert out.shape[1] % 16 == 0 and out.shape[1] >= 20 + 32
    assert out.shape[2] % 16 == 0 and out.shape[2] >= 2 * 48 + 4
    assert (out[:, 20:52, :48] == 0).all() and (out[:, 20:52, 52:100] == 255).all()
    assert out[:, :20, :48].any()  # the caption is drawn
    with pytest.raises(ValueError, match="one caption per video"):
        side_by_side([a, b], ["only one"])
    with pytest.raises(ValueError, match="one shape"):
        side_by_side([a, b[:, :16]], ["a", "b"])


def test_generate_out_of_memory_is_reported(tmp_path, capsys, monkeypatch):
    class OOMPipe:
        transformer = None

        def set_progress_bar_config(self, **k):
            pass

        def __call__(self, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(sys.modules["dit_sparse.cli.generate"], "load", lambda s: OOMPipe())
    monkeypatch.setattr(sys.modules["dit_sparse.cli.generate"], "check_video_size", lambda p, s: None)
    monkeypatch.setattr(cli_run, "_apply", lambda pipe, config: None)
    monkeypatch.setattr(cli_run, "_remove", lambda pipe: None)
    out, report = tmp_path / "v.mp4", tmp_path / "r.json"
    assert main(["generate", "--prompt", PROMPT, "--out", str(out), "--report", str(report)] + TINY) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "--cpu-offload" in err and err.count("\n") == 1
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------- quality report helpers
def _load_quality_report():
    return load_script("quality_report")


def test_quality_report_summary_markdown_and_plot(tmp_path):
    qr = _load_quality_report()
    records = []
    for seed, (t_dense, t_fast, p_fast) in enumerate([(4.0, 2.0, 28.0), (6.0, 2.0, 24.0)]):
        records.append({"preset": "dense", "seed": seed, "seconds": t_dense, "psnr_db": math.inf, "ssim": 1.0,
                        "density": 1.0, "effective_density": 1.0, "recall": None})
        records.append({"preset": "fast", "seed": seed, "seconds": t_fast, "psnr_db": p_fast, "ssim": 0.9,
                        "density": 0.25, "effective_density": 0.4, "recall": None,
                        "judge": {"matches": 2 + seed, "of": 4}})
    rows = qr.summarize(records, ["fast"])
    dense, fast = rows
    assert dense["psnr_db"] == math.inf and dense["speedup"] == pytest.approx(1.0)
    assert fast["speedup"] == pytest.approx(2.5) and fast["psnr_db"] == pytest.approx(26.0)
    assert fast["psnr_db_min"] == 24.0 and fast["meets_target"] is True  # fast target: 25 dB
    assert fast["recall"] is None
    assert fast["prompt_matches"] == pytest.approx(2.5) and dense["prompt_matches"] is None  # dense: not judged

    e2e_path = tmp_path / "e2e.json"
    # The layout scripts/bench_e2e.py writes (only the fields read here).
    e2e_path.write_text(json.dumps({"gpu": "H200", "wan": {"model": "Wan2.1-1.3B", "presets": {
        "fast": {"speedup": 2.2, "total_s": 10.0}, "turbo": {"total_s": 5.0}}}, "hunyuan": {"presets": {}}}))
    e2e, where = qr.read_e2e_speedups(e2e_path)
    assert e2e == {"fast": 2.2} and where == "H200, Wan2.1-1.3B, 480p"
    assert qr.read_e2e_speedups(tmp_path / "missing.json") == ({}, None)

    meta = {"settings": {"model": "default", "frames": 5, "height": 32, "width": 32, "steps": 2, "guidance": 5.0,
                         "device": "cpu", "dtype": "float32"},
            "prompts": ["a"], "seeds": [0, 1], "date": "2025-01-01", "machine": "CPU"}
    md = qr.render_markdown(rows, meta, e2e, where)
    fast_line = next(line for line in md.splitlines() if line.startswith("| fast"))
    assert "2.50x" in fast_line and "26.00" in fast_line and "met (>= 25 dB)" in fast_line and "2.20x" in fast_line
    assert "n/a" in fast_line  # no recall in the stats: shown as n/a, never invented
    assert "| 0.9000 | 2.50 |" in fast_line
    assert "| 1.0000 | - |" in next(line for line in md.splitlines() if line.startswith("| dense"))
    png = tmp_path / "q.png"
    qr.plot(rows, png, e2e)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ============================================================================ with the default model
def _read_video(path) -> np.ndarray:
    return np.stack(list(iio.imiter(path)))


def _one_error_line(err: str) -> str:
    """The error message: exactly one line, the last one on stderr (a model warning may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dit-sparse:")]
    assert len(errors) == 1 and errors[0].startswith("dit-sparse: error: ") and lines[-1] == errors[0], err
    return errors[0]


def test_generate_writes_video_and_report(tmp_path, capsys):
    out, report = tmp_path / "v.mp4", tmp_path / "r.json"
    argv = ["generate", "--prompt", PROMPT, "--preset", "fast", "--out", str(out), "--report", str(report)]
    assert main(argv + TINY) == 0
    assert _files(tmp_path) == ["r.json", "v.mp4"]  # no temporaries left
    assert _read_video(out).shape == (5, 32, 32, 3)
    data = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert data["preset"] == "fast" and data["config"]["preset_name"] == "fast"
    s = data["settings"]
    assert (s["frames"], s["height"], s["width"], s["steps"], s["device"]) == (5, 32, 32, 2, "cpu")
    assert len(data["timings"]["step_s"]) == 2 and data["timings"]["generate_s"] > 0
    assert "transformer_calls" in data["stats"]
    assert data["versions"]["torch"] and data["versions"]["diffusers"] and data["versions"]["python"]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("fast: ") and summary.endswith(f"-> {out}")
    from dit_sparse.cli.presets_cmd import measured_speedup

    speed = measured_speedup("fast")  # from the preset table (benchmarks/e2e.json), or none
    assert (f"speedup vs dense {speed['text']}" if speed else "speedup vs dense not measured") in summary
    assert data["measured_speedup_vs_dense"] == speed


def test_prompt_outside_the_default_models_grammar_gets_a_note(tmp_path, capsys):
    # It still generates; the note says what the model knows and which word does not fit.
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a red circle moving left", "--out", str(out)] + TINY) == 0
    err = capsys.readouterr().err
    assert "note: the default model was trained only on prompts like" in err and "ends too early" in err
    assert _read_video(out).shape == (5, 32, 32, 3)
    from dit_sparse.pipelines.default_model import prompt_note

    assert prompt_note(PROMPT) is None and prompt_note("a green ring growing on a striped black background") is None
    assert "word 3 is 'cat'" in prompt_note("a red cat moving left on a blue background")


@pytest.mark.parametrize("size, flag", [(["--frames", "6"], "--frames"), (["--height", "40"], "--height")])
def test_size_the_model_cannot_take(tmp_path, capsys, size, flag):
    out = tmp_path / "v.mp4"
    argv = ["generate", "--prompt", "x", "--out", str(out)] + TINY + size
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot make" in line and "nearest valid:" in line and flag in line
    assert _files(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing", "not_diffusers", "hub_id"])
def test_bad_model_is_one_line_error(tmp_path, capsys, kind):
    outdir = tmp_path / "out"
    outdir.mkdir()
    if kind == "missing":
        model = str(tmp_path / "no_such_model")
    elif kind == "not_diffusers":
        model = tmp_path / "plain_folder"
        model.mkdir()
        (model / "weights.bin").write_bytes(b"\0" * 16)
        model = str(model)
    else:
        model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    argv = ["generate", "--prompt", "x", "--model", model, "--out", str(outdir / "v.mp4"), "--report",
            str(outdir / "r.json")] + TINY
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)
    assert _files(outdir) == []


def test_compare_two_presets(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    with_progress = [a for a in TINY if a != "--no-progress"]
    assert main(["compare", "--prompt", PROMPT, "--presets", "fast,dense", "--out-dir", str(out_dir)]
                + with_progress) == 0
    assert _files(out_dir) == ["compare.json", "dense.mp4", "fast.mp4", "side_by_side.gif", "side_by_side.mp4"]
    for name in ("dense.mp4", "fast.mp4"):
        assert _read_video(out_dir / name).shape == (5, 32, 32, 3)
    sbs = _read_video(out_dir / "side_by_side.mp4")
    assert sbs.shape[0] == 5 and sbs.shape[2] >= 2 * 32
    assert np.stack(list(iio.imiter(out_dir / "side_by_side.gif"))).shape[0] == 5
    data = json.loads((out_dir / "compare.json").read_text())
    rows = {r["preset"]: r for r in data["presets"]}
    assert list(rows) == ["dense", "fast"]
    assert rows["dense"]["psnr_db"] is None and rows["dense"]["ssim"] == pytest.approx(1.0)  # inf -> null
    fast = rows["fast"]
    assert fast["psnr_db"] is None or fast["psnr_db"] > 0
    assert -1.0 <= fast["ssim"] <= 1.0 and fast["seconds"] > 0
    for row in rows.values():  # PROMPT is in the procedural grammar: every video is judged
        judge = row["judge"]
        assert judge["of"] == 4 and 0 <= judge["matches"] <= 4 and set(judge["seen"]) == set(ATTRIBUTES)
        assert judge["all_correct"] == (judge["matches"] == 4)
    captured = capsys.readouterr()
    assert "psnr_db" in captured.out and "fast" in captured.out and "dense" in captured.out
    assert f"{rows['fast']['judge']['matches']}/4" in captured.out and "pixel judge" in captured.out
    assert "fast: 100%" in captured.err and "2/2" in captured.err  # one progress bar per run, a tick per step


def test_compare_judges_only_prompts_of_the_procedural_grammar():
    from dit_sparse.cli.compare import format_table, judge_prompt
    from dit_sparse.data import render_videos, sample_spec

    spec = sample_spec(777, 0)
    video = (render_videos([spec], 9, 64, 64)[0].numpy() * 255).round().astype(np.uint8)
    judge = judge_prompt(video, spec.prompt)
    assert judge["matches"] == 4 and judge["all_correct"]  # the render itself: what the prompt asks
    wrong = spec.prompt.replace(spec.attrs.shape, "ring" if spec.attrs.shape != "ring" else "square")
    assert judge_prompt(video, wrong)["matches"] == 3
    assert judge_prompt(video, "a cat playing piano") is None  # outside the grammar: no verdict
    assert judge_prompt(video[:1], spec.prompt) is None and judge_prompt(video[:, :8, :8], spec.prompt) is None
    row = {"preset": "fast", "seconds": 1.0, "speedup_vs_dense": 1.0, "psnr_db": 30.0, "ssim": 0.9}
    assert "prompt" not in format_table([{**row, "judge": None}])
    assert " 4/4" in format_table([{**row, "judge": judge}])


def test_masks_writes_pngs(tmp_path, capsys):
    out_dir = tmp_path / "masks"
    # One 192x192 frame: 12x12 = 144 tokens, two kernel blocks; 2 steps: one dense, one sparse.
    argv = ["masks", "--preset", "fast", "--out", str(out_dir), "--frames", "1", "--height", "192", "--width", "192",
            "--steps", "2", "--guidance", "1", "--no-progress"]
    assert main(argv) == 0
    data = json.loads((out_dir / "masks.json").read_text())
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs and pngs == sorted(p["file"] for p in data["pictures"])
    for name in pngs:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = data["pictures"][0]
    assert first["pattern"].startswith("tile3d") and len(first["density_per_head"]) == first["heads"]
    assert "layout pictures" in capsys.readouterr().out


def test_masks_without_sparse_layouts_fails_cleanly(tmp_path, capsys):
    out_dir = tmp_path / "masks"
    assert main(["masks", "--preset", "fast", "--out", str(out_dir)] + TINY + ["--steps", "1"]) == 2
    assert "kept no block layouts" in _one_error_line(capsys.readouterr().err)
    assert not out_dir.exists()


def test_quality_report_end_to_end(tmp_path, capsys):
    qr = _load_quality_report()
    argv = ["--presets", "fast", "--prompts", PROMPT, "--seeds", "0", "--no-warmup", "--out-dir",
            str(tmp_path), "--e2e", str(tmp_path / "no_e2e.json")] + TINY + ["--steps", "1"]
    assert qr.main(argv) == 0
    assert _files(tmp_path) == ["quality.json", "quality.md", "quality.png"]
    data = json.loads((tmp_path / "quality.json").read_text())
    assert [r["preset"] for r in data["presets"]] == ["dense", "fast"] and len(data["runs"]) == 2
    md = (tmp_path / "quality.md").read_text()
    assert "| fast |" in md and "e2e.json` not found" in md


def test_cli_defaults_match_the_default_model():
    from dit_sparse.pipelines import default_model as dm

    s = cli_run.GenerationSettings()
    assert (s.frames, s.height, s.width, s.fps, s.guidance) == (
        dm.DEFAULT_FRAMES, dm.DEFAULT_HEIGHT, dm.DEFAULT_WIDTH, dm.DEFAULT_FPS, dm.DEFAULT_GUIDANCE_SCALE
    )
    assert s.steps <= dm.DEFAULT_NUM_INFERENCE_STEPS and s.model == "default"


def test_parse_variant_changes_fields_of_a_preset():
    cfg = cli_run.parse_variant("fast:dense_steps=0.3:window=[5,5,5]:reuse_scope=block")
    fast = cli_run.resolve_preset("fast")
    assert cfg.dense_steps == 0.3 and tuple(cfg.window) == (5, 5, 5) and cfg.preset_name is None
    assert cfg.reuse_every == fast.reuse_every and cfg.reuse_scope == fast.reuse_scope == "block"
    # the JSON-file form of the scripts takes the same path
    same = cli_run.derive_config("fast", {"dense_steps": 0.3, "window": [5, 5, 5]}, "--config x")
    assert same.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("spec, message", [
    ("fast", "expected PRESET:FIELD=VALUE"),
    ("fast:dense_steps", "'dense_steps' is not FIELD=VALUE"),
    ("warp:dense_steps=0.1", "unknown preset 'warp'"),
    ("fast:windw=[3,3,3]", "windw"),
    ("fast:dense_steps=2.5", "dense_steps"),
])
def test_parse_variant_rejects_bad_specs(spec, message):
    with pytest.raises(CLIError, match=message) as err:
        cli_run.parse_variant(spec)
    assert str(err.value).startswith(f"--variant {spec!r}")
