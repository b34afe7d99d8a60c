"""Time relkd.hardest_identities on C random prototypes (D=256, k=100):
`python3 benchmarks/hardest_identities_time.py C`. For an A/B, run it with
PYTHONPATH pointing at another built checkout too; it prints which relkd ran,
the seconds, and a checksum of the first neighbours."""
import sys
import time

import torch

import relkd


def main() -> None:
    count, dim, k = int(sys.argv[1]), 256, 100
    torch.manual_seed(0)
    prototypes = torch.randn(count, dim)
    start = time.perf_counter()
    hard = relkd.hardest_identities(prototypes, k)
    seconds = time.perf_counter() - start
    print(f"{relkd.__file__}: hardest_identities C={count} D={dim} k={k}: {seconds:.2f} s, "
          f"checksum {int(hard[:, 0].sum())}", flush=True)


if __name__ == "__main__":
    main()
