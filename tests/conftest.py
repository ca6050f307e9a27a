"""Shared fixtures: the real LLaMA-2 tokenizer and a small toy world, each made once per test session, and the devices
a test runs on."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def llama_tokenizer():
    from data import load_tokenizer
    return load_tokenizer(FIXTURES / "llama2-tokenizer")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """make_toy_world's paths for a small world (seed 0): 60 training images, 10 held out."""
    from data import make_toy_world
    return make_toy_world(tmp_path_factory.mktemp("toy_world"), n_train_images=60, n_stage1=60, n_stage2=120,
                          n_eval_images=10)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                               reason="needs a CUDA GPU"))])
def device(request):
    """A test taking `device` runs on the CPU, and again on CUDA where there is a GPU."""
    return request.param
