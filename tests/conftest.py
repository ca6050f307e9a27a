"""Shared fixtures: the real LLaMA-2 tokenizer and a small toy world, each made once per test session, and the devices
a test runs on."""

import os
import signal
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REAL_CUDA_IS_AVAILABLE = torch.cuda.is_available
HAS_CUDA = REAL_CUDA_IS_AVAILABLE()
VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")  # as the suite found it
# a suite started in the background (`cmd &` ignores Ctrl-C) would pass the ignoring on to the processes whose Ctrl-C
# the tests send; a handled signal is reset to the default in a child, an ignored one is not
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def cpu_unless_the_test_asks_for_cuda():
    """train.py, eval.py and chat.py take the GPU when their --device is "auto" and there is one. The suite is written
    for the CPU (fp32 references, bitwise resume, two gloo ranks on one machine, which on one GPU would ask for a
    second), so on a GPU machine the GPU is hidden from every test, in-process and in its subprocesses, but from those
    that take `device` and got "cuda"."""
    with pytest.MonkeyPatch.context() as hidden:
        if HAS_CUDA:
            hidden.setenv("CUDA_VISIBLE_DEVICES", "")  # subprocesses see no GPU
            hidden.setattr(torch.cuda, "is_available", lambda: False)  # nor does "auto" in this process
        yield


@pytest.fixture(scope="session")
def llama_tokenizer():
    from plumbing.tokenizer import load_tokenizer
    return load_tokenizer(FIXTURES / "llama2-tokenizer")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """make_toy_world's paths for a small world (seed 0): 60 training images, 10 held out."""
    from toy import make_toy_world
    return make_toy_world(tmp_path_factory.mktemp("toy_world"), n_train_images=60, n_stage1=60, n_stage2=120,
                          n_eval_images=10, vocab_size=600)  # a vocabulary the small world's text fills


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))])
def device(request, monkeypatch):
    """A test taking `device` runs on the CPU, and again on CUDA where there is a GPU."""
    if request.param == "cuda":
        show_the_gpu(monkeypatch)
    return request.param


def show_the_gpu(monkeypatch):
    """Undo cpu_unless_the_test_asks_for_cuda for one test and its subprocesses."""
    if VISIBLE_DEVICES is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", VISIBLE_DEVICES)
    monkeypatch.setattr(torch.cuda, "is_available", REAL_CUDA_IS_AVAILABLE)
