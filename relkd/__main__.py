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
    info = ops.build_info()
    if "cuda" in devices:
        print(f"CUDA kernels: compiled for {info.get('cuda_archs')} (CUDA runtime: "
              f"{info.get('cudart')}; tensor-core staging, units per step x steps: "
              f"{info.get('mma_staging')}; wide sub-tile / warp tile: "
              f"{info.get('mma_wide')}; selection's: {info.get('mma_select')})")
        mode = os.environ.get("RELKD_TENSOR_CORES", "0")
        if mode not in ("0", "1", "auto"):
            print(f"  RELKD_TENSOR_CORES={mode!r} is not 0, 1 or auto: the CUDA top-k and "
                  "pairwise kernels raise a ValueError until it is")
        precision = torch.get_float32_matmul_precision()
        float32_format = ("invalid" if mode not in ("0", "1", "auto") else "off" if mode == "0"
                          else "bf16" if mode == "1" or precision == "medium"
                          else "TF32" if precision == "high" else "3xTF32")
        half_on = mode in ("1", "auto")
        print(f"  tensor-core kernels (bf16 / fp16 / TF32 / 3xTF32 mma; RELKD_TENSOR_CORES=1 "
              f"always, =auto for bfloat16 / float16 inputs and for float32 ones at matmul "
              f"precision 'medium' (bf16), 'high' (TF32) or 'highest' (3xTF32); not yet "
              f"validated on a GPU): float32 inputs {float32_format}, bfloat16 / float16 "
              f"inputs {'on' if half_on else 'off'} (RELKD_TENSOR_CORES={mode}, precision "
              f"{precision!r})")
    else:
        print("CUDA kernels: not compiled (no CUDA toolkit at build time, or RELKD_CUDA=0)")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (usable by torch"
              f"{'' if 'cuda' in devices else '; relkd runs the reference on it'})")
    else:
        print("GPU: none usable by torch")
    print(f"OpenMP threads: {torch.get_num_threads()}")
    print("backend='auto' runs:")
    for name, where in functional.fused_losses().items():
        label = "plain PyTorch (O(N*D), no relation matrix)" if where == ["any"] else (
            f"fused on {', '.join(where)}" if where else "reference (no fused kernels loaded)")
        print(f"  {name:45s} {label}")


if __name__ == "__main__":
    main()
