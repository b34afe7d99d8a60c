"""How many pairs EKD's one-pass top-k keeps on CUDA: the negative pairs at
or above the order key a row sample predicts just below the k-th pair's
(relkd.ops.predicted_top_key: the lowest key of a 16-bit first-pass bin),
against k and the buffer the CUDA op allocates (max(4 k, 65,536) pairs). Runs on the CPU: the prediction
is the same Python on either device.

    python3 benchmarks/ekd_top_key.py [--n 8192] [--dim 512] [--k 2000]
"""
import argparse

import torch

from relkd import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x = torch.nn.functional.normalize(torch.randn(args.n, args.dim), dim=1)
    y = torch.randint(0, max(args.n // 8, 1), (args.n,))
    bits = 32
    common = (x, None, y, None, None, None)
    n_neg = args.n * (args.n - 1) // 2 - int(ops.positive_pair_count(y))
    sample = ops._sample_counts(common, bits)
    key = ops.predicted_top_key(sample, args.k, n_neg, bits)
    s = x @ x.T
    iu = torch.triu_indices(args.n, args.n, 1)
    values = s[iu[0], iu[1]][y[iu[0]] != y[iu[1]]]
    del s
    kth = float(values.topk(args.k).values[-1])
    at_key = ops.key_to_value(key, bits)
    print(f"N={args.n} D={args.dim} k={args.k}: {n_neg} negative pairs, k-th value {kth:.6f}")
    print(f"predicted key's value {at_key:.6f}: {int((values >= at_key).sum())} pairs at or above")
    print(f"CUDA buffer: {max(4 * args.k, 1 << 16)} pairs")


if __name__ == "__main__":
    main()
