"""Run at start-up by every Python process the tests start (tests/site is first on their PYTHONPATH):
with RLFT_TEST_MKLDNN=0 (``pytest --mkldnn=off``), torch's oneDNN kernels are off there too; with
RLFT_TEST_KILL_IN_BACKWARD_AFTER, the process kills itself inside a backward pass (tests/test_train.py)."""

import os

if os.environ.get("RLFT_TEST_MKLDNN") == "0":
    import torch

    torch.backends.mkldnn.enabled = False

if os.environ.get("RLFT_TEST_KILL_IN_BACKWARD_AFTER"):
    # the kill-anywhere resume test: once this file exists, SIGKILL the process from inside the next
    # backward pass through a UNet (a hook on the UNet output's gradient), leaving a note that it did
    import signal
    from pathlib import Path

    import torch

    _after = Path(os.environ["RLFT_TEST_KILL_IN_BACKWARD_AFTER"])

    def _kill_in_backward(grad):
        if _after.exists():
            Path(os.environ["RLFT_TEST_KILLED_NOTE"]).write_text("killed inside backward")
            os.kill(os.getpid(), signal.SIGKILL)
        return grad

    def _hook_unet_output(module, args, output):
        if type(module).__name__ != "UNet2DConditionModel":
            return
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.requires_grad:
            sample.register_hook(_kill_in_backward)

    torch.nn.modules.module.register_module_forward_hook(_hook_unet_output)
