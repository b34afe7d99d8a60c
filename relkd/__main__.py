"""`python -m relkd`: what this installation can do."""
import os

import torch

import relkd
from relkd import functional, ops


def main() -> None:
    print(f"relkd {relkd.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if ops.HAS_EXTENSION:
        print(f"extension relkd._C: loaded ({relkd._C.__file__})")
    else:
        print(f"extension relkd._C: {ops.EXTENSION_STATE.upper()}: {ops.EXTENSION_ERROR}")
        print("  every loss runs the N x N reference (backend='auto' warns once per loss)")
    devices = ops.fused_devices()
    print(f"fused kernels compiled for: {', '.join(devices) or 'nothing'}")
    cuda = "cuda" in devices
    print(f"CUDA kernels: {'compiled' if cuda else 'not compiled (none written yet)'}; "
          f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0 (default)')}")
    print(f"OpenMP threads: {torch.get_num_threads()}")
    print("backend='auto' runs:")
    for name, where in functional.fused_losses().items():
        label = "plain PyTorch (O(N*D), no relation matrix)" if where == ["any"] else (
            f"fused on {', '.join(where)}" if where else "reference (no fused kernels loaded)")
        print(f"  {name:45s} {label}")
    print(f"  {'RKDLoss with angle_weight != 0':45s} reference (the angle term is O(N^3))")


if __name__ == "__main__":
    main()
