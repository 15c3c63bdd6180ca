import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every test that takes `device` runs on the CPU, and on CUDA when a GPU is present.
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]
LOW_PRECISION = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *LOW_PRECISION]

# Added to the eager-relative bound: |fused - ref64| <= 2 |eager - ref64| + ATOL.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-4}


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh inputs per test, reproducible from the test's id (SIT_EXT_TEST_SEED varies them all).
    base = int(os.environ.get("SIT_EXT_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + base)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "device" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("device", DEVICES)
