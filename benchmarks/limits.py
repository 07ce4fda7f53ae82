"""The machine's limits that the benchmarks compare against: the fp32 matmul peak and the compute bound of
decoding (about 2 FLOP per parameter per generated token: one multiply-add per weight)."""
from __future__ import annotations

import statistics
import time


def fp32_matmul_gflops(size: int = 2048, threads: int = 2, reps: int = 7) -> float:
    """Median GFLOP/s of a large fp32 matmul (torch, `threads` threads): the practical fp32 peak."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up (allocations, oneDNN/MKL kernels)
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(seconds) / 1e9


def model_parameters(model_dir: str) -> int:
    """Parameters stored in a safetensors folder, read from the headers (no weights loaded). A tied head
    is stored once, and it is counted once: decoding multiplies by it once per token too."""
    from pathlib import Path

    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def decode_limit_line(model_dir: str, tokens_per_s: dict[str, float]) -> str:
    """The compute bound for decoding this model at the measured fp32 peak, and each figure's share of it."""
    peak = fp32_matmul_gflops()
    params = model_parameters(model_dir)
    bound = peak * 1e9 / (2 * params)
    shares = ", ".join(f"{k} {v:.0f} tok/s = {v / bound:.0%}" for k, v in tokens_per_s.items())
    return (f"compute limit: fp32 matmul peak {peak:.0f} GFLOP/s (2048^2, 2 threads, median of 7) / (2 x {params / 1e6:.1f}M "
            f"parameters) = {bound:.0f} tok/s; {shares}")
