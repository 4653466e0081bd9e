"""Tests of `dit-sparse finetune`: SLA fine-tuning of a tiny Wan transformer on CPU.

The model is the embedded default architecture with random weights, cut to 2 layers, trained on
5-frame 128x128 procedural videos (2 x 8 x 8 = 128 video tokens = two SLA blocks of 64, so every query
block has one exact and one linear-attention key block). Each test trains a deep copy of one pipeline.
"""

from __future__ import annotations

import copy
import csv
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_sparse.apply
from dit_sparse.training.atomic import atomic_dir, atomic_file
from dit_sparse.training.checkpoint import latest_checkpoint, list_checkpoints
from dit_sparse.training.config import FinetuneConfig
from dit_sparse.training.data import batch_indices
from dit_sparse.training.flow_matching import eval_sigmas, noisy_input, scheduler_shift, shift_sigmas
from dit_sparse.training.loss_log import LossLog

# Training needs the SLA mode of apply_sparse_attention (per-layer SparseLinearAttention modules).
needs_sla_mode = pytest.mark.skipif(
    not hasattr(dit_sparse.apply, "sla_modules"),
    reason="apply_sparse_attention has no SLA mode yet (dit_sparse.apply.sla_modules is missing)",
)
SMALL = dict(
    num_frames=5, height=128, width=128, max_sequence_length=16, block_size=64, topk=0.5, backend="torch",
    progress=False,
)


@pytest.fixture(scope="module")
def base_pipe():
    from diffusers import WanPipeline, WanTransformer3DModel

    from dit_sparse.pipelines.default_model import TRANSFORMER_CONFIG, build_default_components

    parts = build_default_components(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts["transformer"] = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2}).eval()
    return WanPipeline(**parts)


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


def _finetune(pipe, **kw):
    from dit_sparse.finetune import finetune

    return finetune(FinetuneConfig(**{**SMALL, **kw}), pipe=pipe)


# ---------------------------------------------------------------------------------------------- training
@needs_sla_mode
def test_overfits_one_batch_with_finite_sla_gradients(pipe, tmp_path):
    from dit_sparse.sla import load_sla_weights

    res = _finetune(pipe, out=str(tmp_path / "run"), steps=4, num_samples=1, lr=2e-3, eval_every=4, save_every=0)
    (s0, first), (s4, last) = res.eval_losses
    assert (s0, s4) == (0, 4)
    assert last < 0.9 * first, res.eval_losses  # one fixed batch, fixed noise: the loss must drop
    rows = list(csv.DictReader(open(res.loss_csv)))
    trained = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in trained] == [1, 2, 3, 4]
    for r in trained:
        for key in ("loss", "grad_norm", "sla_grad_norm"):
            assert torch.isfinite(torch.tensor(float(r[key]))), (key, r)
        assert float(r["sla_grad_norm"]) > 0, "the SLA projections got no gradient"
    assert res.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The SLA projections left their zero init, and the file loads back for inference.
    sla = load_sla_weights(res.sla_weights)
    assert len(sla) == 2 and all(m.topk == SMALL["topk"] and m.block_q == SMALL["block_size"] for m in sla.values())
    assert any(m.proj.weight.abs().max() > 0 for m in sla.values())
    assert (res.weights / "config.json").is_file() and res.weights.name == "transformer"
    assert res.checkpoint is not None and res.checkpoint.name == "step-00000004"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "temporary files left behind"


@needs_sla_mode
def test_lora_trains_only_lora_and_sla_params(pipe, tmp_path):
    from dit_sparse.training.loop import install_sla
    from dit_sparse.training.trainable import setup_trainable

    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    probe = copy.deepcopy(pipe.transformer)
    cfg = FinetuneConfig(out=str(tmp_path / "probe"), lora_rank=4, **SMALL)
    sla = install_sla(probe, cfg)
    params = setup_trainable(probe, sla, lora_rank=4)
    sla_ids = {id(p) for m in sla.values() for p in m.parameters()}
    trainable = [(k, p) for k, p in probe.named_parameters() if p.requires_grad and id(p) not in sla_ids]
    assert trainable and all("lora_" in k for k, _ in trainable), [k for k, _ in trainable if "lora_" not in k]
    assert set(params.transformer) == {k for k, _ in trainable}
    assert params.sla and all(p.requires_grad for p in params.sla.values())
    assert any(k.endswith("proj.weight") for k in params.sla)

    res = _finetune(pipe, out=str(tmp_path / "run"), steps=2, num_samples=1, lr=1e-2, lora_rank=4,
                    eval_every=0, save_every=0, grad_checkpointing=True)
    after = pipe.transformer.state_dict()
    base_keys = [k for k in before if k in after]
    assert base_keys and all(torch.equal(before[k], after[k]) for k in base_keys), "a frozen weight changed"
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b), "LoRA B stayed at its zero init"
    assert (res.weights / "pytorch_lora_weights.safetensors").is_file()
    # The saved LoRA loads back into a fresh copy of the model through diffusers.
    fresh = copy.deepcopy(pipe)
    fresh.transformer.delete_adapters("default")
    fresh.load_lora_weights(str(res.weights), adapter_name="sla")
    loaded = {k: v for k, v in fresh.transformer.state_dict().items() if "lora_B" in k}
    assert len(loaded) == len(lora_b)


@needs_sla_mode
def test_resume_restores_step_and_next_loss(pipe, base_pipe, tmp_path):
    out = tmp_path / "run"
    kw = dict(out=str(out), num_samples=1, batch_size=1, lr=1e-3, save_every=2, eval_every=0, keep_checkpoints=0)
    full = _finetune(pipe, steps=3, **kw)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    with pytest.raises(ValueError, match="resume"):
        _finetune(copy.deepcopy(base_pipe), steps=3, **kw)
    resumed = _finetune(copy.deepcopy(base_pipe), steps=3, resume=True, **kw)
    assert resumed.resumed_from == 2 and resumed.step == 3
    assert resumed.losses[:2] == full.losses[:2]  # the log up to the checkpoint comes back
    torch.testing.assert_close(resumed.losses[2][1], full.losses[2][1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="lora_rank"):
        _finetune(copy.deepcopy(base_pipe), steps=4, resume=True, lora_rank=2, **kw)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        FinetuneConfig(out=str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="topk"):
        FinetuneConfig(out=str(tmp_path), topk=0.0)
    with pytest.raises(ValueError, match="feature_map"):
        FinetuneConfig(out=str(tmp_path), feature_map="cosine")
    with pytest.raises(ValueError, match="does not exist"):
        _finetune(pipe, out=str(tmp_path / "a"), data=str(tmp_path / "no_such_folder"), steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .mp4"):
        _finetune(pipe, out=str(tmp_path / "b"), data=str(tmp_path / "empty"), steps=1)
    with pytest.raises(ValueError, match="nearest valid size: 5 frames"):
        _finetune(pipe, out=str(tmp_path / "c"), steps=1, **{"num_frames": 6})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            _finetune(pipe, out=str(tmp_path / "d"), steps=1, bf16=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_reports_bad_input_as_usage_error(tmp_path, capsys):
    import argparse

    from dit_sparse.cli.errors import CLIError
    from dit_sparse.finetune import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nothing")])
    assert args.func is run and args.steps > 0 and args.lora_rank == 0
    with pytest.raises(CLIError, match="does not exist") as e:
        run(args)
    assert e.value.code == 2
    args = parser.parse_args(["finetune", "--out", str(tmp_path / "o"), "--steps", "0"])
    with pytest.raises(CLIError, match="steps"):
        run(args)


# ---------------------------------------------------------------------------------------------- pieces
def test_flow_matching_pieces():
    assert scheduler_shift(type("S", (), {"config": {"flow_shift": 3.0}})()) == 3.0
    assert scheduler_shift(type("S", (), {"config": {"shift": 5.0}})()) == 5.0
    u = torch.linspace(0, 1, 11)
    s = shift_sigmas(u, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > u[1:-1])  # shift > 1 moves sigmas up
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    x0, noise = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)
    x_t, target = noisy_input(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(target, noise - x0)
    e = eval_sigmas(4, 3.0)
    assert torch.all(e[1:] > e[:-1]) and 0 < e[0] and e[-1] < 1
    with pytest.raises(ValueError, match="sigmas"):
        noisy_input(x0, noise, torch.tensor([0.5]))


@settings(max_examples=30, deadline=None)
@given(step=st.integers(0, 50), batch=st.integers(1, 5), n=st.integers(1, 9), seed=st.integers(0, 1000))
def test_batch_indices_cover_each_epoch_once(step, batch, n, seed):
    idx = batch_indices(step, batch, n, seed)
    assert idx == batch_indices(step, batch, n, seed) and len(idx) == batch
    assert all(0 <= i < n for i in idx)
    epoch = [i for s in range(n) for i in batch_indices(s, 1, n, seed)]
    assert sorted(epoch) == list(range(n))  # one epoch visits every sample once


def test_loss_log_csv_round_trip_and_plot(tmp_path):
    log = LossLog()
    log.log(0, eval_loss=2.0)
    for s in range(1, 4):
        log.log(s, loss=1.0 / s, grad_norm=0.5, sla_grad_norm=0.1, lr=1e-3)
    log.log(3, eval_loss=1.5)
    back = LossLog.read_csv(log.write_csv(tmp_path / "log.csv"))
    assert back.column("loss") == log.column("loss") and back.column("eval_loss") == [(0, 2.0), (3, 1.5)]
    back.truncate(1)
    assert [r["step"] for r in back.rows] == [0, 1]
    assert log.plot(tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown loss-log columns"):
        log.log(4, accuracy=1.0)


def test_atomic_writes_leave_old_output_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("two")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"
    f = tmp_path / "x.csv"
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not f.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "checkpoints" / ".step-00000009.abc.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    (tmp_path / "checkpoints" / "step-00000010").mkdir()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000010"
