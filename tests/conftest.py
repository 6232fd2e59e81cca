import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from harness.data import synthetic as syn
from harness.models import embedded

# Torch's threads follow OMP_NUM_THREADS where it is set (the suite is checked with 1, 2 and more);
# otherwise at most 2, so that a many-core machine does not spend its time on thread start-up for
# these small matrices.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A random-weight LLaVA of the embedded architecture (4 decoder layers), saved like a checkpoint.

    Weights are drawn with a wide initialiser so that greedy choices are not near-ties.
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = embedded.build_config(num_layers=4)
    cfg.text_config.initializer_range = 0.3
    cfg.vision_config.initializer_range = 0.3
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    d = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(d)
    embedded.build_processor().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def samples():
    return [syn.make_sample("val", i) for i in range(6)]


def pytest_addoption(parser):
    parser.addoption("--bench-update", action="store_true",
                     help="tests/bench: write the measured ratios and proxies to tests/bench/expected.json "
                          "instead of checking them (make bench-baseline)")
