import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from harness.data import synthetic as syn
from harness.models import embedded
from harness.models.adapter import DEVICE_ENV

TEST_DEVICE_ENV = "TWIGBENCH_TEST_DEVICE"

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
    parser.addoption("--device", default=None,
                     help=f"where the tests run their models: cpu (the default) or cuda / cuda:N; without the "
                          f"option ${TEST_DEVICE_ENV}, else cpu. Models the harness loads itself (sweeps, tools, "
                          f"lmms-eval, subprocesses) follow it through ${DEVICE_ENV}.")


# ---- the test device ------------------------------------------------------------------------
# `--device cuda` (or TWIGBENCH_TEST_DEVICE=cuda) runs every device-independent test on the GPU:
# tests pass the `device` fixture to load_model and put the tensors they build themselves there;
# $TWIGBENCH_DEVICE is set for the rest (harness.models.adapter.default_device). Markers:
#   @pytest.mark.cpu_only("why")   skipped on a GPU run (peak RSS, thread counts, CPU speed baselines)
#   @pytest.mark.cuda_only("why")  skipped on a CPU run
# On CUDA, fp32 matmuls and convolutions are kept in full fp32 (no TF32), so the tolerances of
# tests/numerics.py (fp32 sums in another order) hold there as on a CPU.
_DEVICE: torch.device | None = None


def _parse_device(config) -> torch.device:
    name = config.getoption("--device") or os.environ.get(TEST_DEVICE_ENV) or "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise pytest.UsageError(f"--device {name!r} is not a torch device; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {name!r}; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {name!r}, but torch {torch.__version__} sees no CUDA device "
                                    f"(torch.cuda.is_available() is False)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise pytest.UsageError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)  # the form model.device reports
    return device


def pytest_configure(config):
    global _DEVICE
    config.addinivalue_line("markers", "cpu_only(reason): skipped when the suite runs on a GPU (--device cuda)")
    config.addinivalue_line("markers", "cuda_only(reason): skipped unless the suite runs on a GPU (--device cuda)")
    _DEVICE = _parse_device(config)
    os.environ[DEVICE_ENV] = str(_DEVICE)  # load_model without a device, here and in subprocesses
    if _DEVICE.type == "cuda":
        torch.cuda.set_device(_DEVICE)
        # fp32 stays fp32: TF32 (10-bit mantissa) would break the fp32 tolerances of tests/numerics.py
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    if _DEVICE is not None and _DEVICE.type == "cuda":
        return f"twigbench test device: {_DEVICE} ({torch.cuda.get_device_name(_DEVICE)}; TF32 off)"
    return f"twigbench test device: {_DEVICE}"


def pytest_collection_modifyitems(config, items):
    cuda = _DEVICE is not None and _DEVICE.type == "cuda"
    for item in items:
        if cuda and item.get_closest_marker("bench") is not None:
            item.add_marker(pytest.mark.skip(reason="tests/bench gates CPU speed ratios (expected.json was "
                                                    "measured on a CPU); not run with --device cuda"))
        mark = item.get_closest_marker("cpu_only" if cuda else "cuda_only")
        if mark is not None:
            why = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
            where = "CPU-only" if cuda else "needs --device cuda"
            item.add_marker(pytest.mark.skip(reason=f"{where}: {why}" if why else where))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the suite runs on (--device / $TWIGBENCH_TEST_DEVICE; default cpu)."""
    return _DEVICE
