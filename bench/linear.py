"""float32 GEMM throughput of torch's CPU linear (MKL) against oneDNN's, on the real-size SmolVLA LoRA step's shapes.

    .venv/bin/python bench/linear.py [--repeats 10]

For each (tokens M, in K, out N) the three products of a linear layer in training: the forward x @ W^T, the input
gradient dy @ W and the weight gradient dy^T @ x, through torch (`F.linear` / `mm`, MKL's sgemm on CPU) and through
`finetune.policies.cpu_linear` (oneDNN, strided views, as `--policy.cpu-linear onednn` runs them). Prints GFLOP/s
(2*M*K*N flops per product, the median of `--repeats` calls after 2 warm-up calls) and oneDNN's ratio to torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.policies.cpu_linear import _onednn_matmul  # noqa: E402

# (M, K, N): SigLIP at 512 px, batch 2 (1024 patches x 2, width 768, MLP 3072); the text layers (batch 2 x ~113
# prefix tokens, width 960); the expert (batch 2 x 50 actions, width 720); a LoRA A/B product (rank 64).
SHAPES = {
    "SigLIP MLP up": (2048, 768, 3072),
    "SigLIP MLP down": (2048, 3072, 768),
    "SigLIP q/k/v/o": (2048, 768, 768),
    "text q/o": (226, 960, 960),
    "text MLP up": (226, 960, 2560),
    "expert MLP up": (100, 720, 2048),
    "LoRA A (r 64)": (226, 960, 64),
}


def gflops(fn, flops: int, repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| layer | M x K x N | product | torch GFLOP/s | oneDNN GFLOP/s | oneDNN / torch |")
    print("|-------|-----------|---------|---------------|----------------|----------------|")
    with torch.no_grad():
        for name, (m, k, n) in SHAPES.items():
            x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
            products = {
                "forward": (lambda: torch.nn.functional.linear(x, w), lambda: _onednn_matmul(x, w, None)),
                "dx": (lambda: dy @ w, lambda: _onednn_matmul(dy, w.t(), None)),
                "dW": (lambda: dy.t() @ x, lambda: _onednn_matmul(dy.t(), x.t(), None)),
            }
            for product, (aten, onednn) in products.items():
                torch.testing.assert_close(onednn(), aten(), rtol=1e-4, atol=1e-3)  # the same product
                a, o = gflops(aten, 2 * m * k * n, args.repeats), gflops(onednn, 2 * m * k * n, args.repeats)
                print(f"| {name} | {m}x{k}x{n} | {product} | {a:.0f} | {o:.0f} | {o / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
