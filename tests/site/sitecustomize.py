"""Run at start-up by every Python process the tests start (tests/site is first on their PYTHONPATH):
with RLFT_TEST_MKLDNN=0 (``pytest --mkldnn=off``), torch's oneDNN kernels are off there too; with
RLFT_TEST_KILL_IN_BACKWARD_AFTER, the process kills itself inside a backward pass (tests/test_train.py);
with RLFT_TEST_FSDP_ON_CPU=1, accelerate shards with its FSDP config on a CPU too (tests/test_fsdp.py)."""

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

if os.environ.get("RLFT_TEST_FSDP_ON_CPU") == "1":
    # tests/test_fsdp.py: accelerate turns its FSDP config into sharding only on accelerators (on a CPU it
    # trains plain data parallel); lift that one check, so that accelerate's own FSDP2 path (fully_shard
    # over gloo, as torch supports on CPU) runs in the test's two CPU processes
    from accelerate import state as _state

    _init = _state.AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == _state.DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = plugin
            _state.PartialState._shared_state["distributed_type"] = _state.DistributedType.FSDP

    _state.AcceleratorState.__init__ = _fsdp_on_cpu
