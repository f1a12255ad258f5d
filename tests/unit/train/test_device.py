"""train.device / train.compile: validated config fields; devices resolved with clear errors; autocast on the
model's device (softmoe/common/precision.py)."""

from __future__ import annotations

import pytest
import torch

from softmoe.common.precision import autocast_context, check_device_name, module_device, resolve_device
from softmoe.train.config import RunConfig, TrainConfig, ParallelConfig


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(name):
    assert TrainConfig(device=name).device == name


@pytest.mark.parametrize("name", ["gpu", "", "cuda:", "cuda:x", "cpu:0", 0, None, "CUDA"])
def test_bad_device_names_name_the_field(name):
    with pytest.raises(ValueError, match=r"train\.device="):
        TrainConfig(device=name)


def test_compile_must_be_a_bool_and_single_process():
    with pytest.raises(TypeError, match=r"train\.compile"):
        TrainConfig(compile="yes")
    with pytest.raises(ValueError, match=r"train\.compile=true .*parallel\.data='ddp'"):
        RunConfig(train=TrainConfig(compile=True), parallel=ParallelConfig(data="ddp"))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"train\.device='cuda': CUDA is not available"):
            resolve_device("cuda", "train.device")
    with pytest.raises(ValueError, match=r"device='tpu'"):
        check_device_name("tpu")


def test_autocast_context_follows_the_device():
    x = torch.randn(4, 4)
    with autocast_context("bf16", torch.device("cpu")):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_context("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp16'"):
        autocast_context("fp16", "cpu")


def test_module_device():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_the_cli_refuses_cuda_without_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from softmoe.cli import main

    code = main(["train", "--config", "tiny/softmoe", "--out", str(tmp_path), "--quiet", "train.device=cuda",
                 f"data.data_dir={tmp_path / 'data'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.device='cuda'" in err[0] and "CUDA is not available" in err[0]


def test_eval_and_inference_name_a_bad_device():
    from softmoe.eval.evaluate import EvalSettings
    from softmoe.train.restore import load_model

    with pytest.raises(ValueError, match="device='tpu'"):
        EvalSettings(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("no/such/run", device="cuda")  # checked before the checkpoint is read
