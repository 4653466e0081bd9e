"""scripts/profile_kernels.py on CPU (the profiling run needs a GPU): its options and the clear refusal
without CUDA."""

import pytest
import torch

from _scripts import load_script  # tests/ helper


@pytest.fixture(scope="module")
def script():
    return load_script("profile_kernels")


def test_options(script):
    args = script.parse_args(["--shape", "hunyuan", "--density", "0.25", "--no-cudnn"])
    assert (args.shape, args.density, args.no_cudnn, args.seed) == ("hunyuan", 0.25, True, 0)
    assert script.parse_args([]).shape == "wan" and script.parse_args([]).density == 0.1


@pytest.mark.parametrize("argv", [["--density", "0"], ["--density", "1.5"], ["--shape", "mochi"]])
def test_bad_options_are_refused(script, argv, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    assert e.value.code == 2
    assert "--density must lie in (0, 1]" in capsys.readouterr().err or argv[0] == "--shape"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(script):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        script.main(["--density", "0.1"])
