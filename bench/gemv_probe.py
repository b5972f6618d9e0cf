"""GB/s of weight read by each single-row product kernel on this CPU, each called alone.

For fp32, bf16 and int8 weights: eager BLAS (`F.linear`, `torch.mv`), the compiled multiply-reduce that `compile()`
puts in the decode step (glmimage/quant.py `_rowwise`), and the int8 CPU kernel (`torch._weight_int8pack_mm`),
beside a plain read (`sum`) and the copy bandwidth that `glmimage bench` takes for its roofline. The weights are
cycled through a working set of about 384 MiB so that no dtype is served from the cache. Takes about a minute. A
kernel called alone pays its call for every product, which the AR's compiled decode step does not: this ranks
kernels, `glmimage bench` decides.

    python bench/gemv_probe.py [--threads 2] [--dim 4096] [--mib 384]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from glmimage.bench import copy_bandwidth
from glmimage.quant import _rowwise


def gbps(fn, ws: list[torch.Tensor], reps: int) -> float:
    for w in ws:  # warm-up (and the compilation)
        fn(w)
    t = time.perf_counter()
    for _ in range(reps):
        for w in ws:
            fn(w)
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def show(label: str, rate: float) -> None:
    print(f"{label:<58}{rate:6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=4096, help="N = K of each weight")
    p.add_argument("--mib", type=int, default=384, help="working set per dtype")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n, reps = a.dim, a.reps

    def weights(dtype: torch.dtype) -> list[torch.Tensor]:  # as many n×n weights as fill the working set
        count = max(1, a.mib * 2**20 // (n * n * torch.empty(0, dtype=dtype).element_size()))
        if dtype == torch.int8:
            return [torch.randint(-127, 128, (n, n), dtype=dtype) for _ in range(count)]
        return [torch.randn(n, n).to(dtype) for _ in range(count)]

    print(f"threads {torch.get_num_threads()}, {n}x{n} weights, {a.mib} MiB per dtype; GB/s of weight read")
    show("read (sum)", gbps(lambda w: w.sum(), [torch.randn(a.mib * 2**18)], reps))
    show("copy (read + write; glmimage bench's roofline)", copy_bandwidth(a.mib * 2**20) / 1e9)
    compiled = torch.compile(lambda x, w, s: _rowwise(x, w, s), dynamic=False)
    for dt in (torch.float32, torch.bfloat16):
        ws, x = weights(dt), torch.randn(1, n).to(dt)
        show(f"{dt} F.linear", gbps(lambda w: F.linear(x, w), ws, reps))
        show(f"{dt} torch.mv", gbps(lambda w: torch.mv(w, x[0]), ws, reps))
        show(f"{dt} compiled multiply-reduce", gbps(lambda w: compiled(x, w, None), ws, reps))
        del ws
    qs, scale = weights(torch.int8), torch.rand(n)
    for dt in (torch.float32, torch.bfloat16):
        x, s = torch.randn(1, n).to(dt), scale.to(dt)
        show(f"int8, {dt} activations, compiled multiply-reduce", gbps(lambda w: compiled(x, w, s), qs, reps))
    xb, sb = torch.randn(1, n).to(torch.bfloat16), scale.to(torch.bfloat16)
    show("int8, bf16 activations, _weight_int8pack_mm", gbps(lambda w: torch._weight_int8pack_mm(xb, w, sb), qs, reps))

if __name__ == "__main__":
    main()
