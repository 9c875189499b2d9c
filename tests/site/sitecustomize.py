"""Run at start-up by every Python process the tests start (tests/site is first on their PYTHONPATH):
with RLFT_TEST_MKLDNN=0 (``pytest --mkldnn=off``), torch's oneDNN kernels are off there too."""

import os

if os.environ.get("RLFT_TEST_MKLDNN") == "0":
    import torch

    torch.backends.mkldnn.enabled = False
