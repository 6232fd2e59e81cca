import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from harness.data import synthetic as syn
from harness.models import embedded

torch.set_num_threads(2)


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
