"""GB/s of weight read by each single-row product kernel on this CPU, each called alone.

For fp32, bf16 and int8 weights: eager BLAS (`F.linear`, `torch.mv`), the compiled multiply-reduce that `compile()`
puts in the decode step (glmimage/quant.py `_rowwise`), and the int8 CPU kernel (`torch._weight_int8pack_mm`),
beside a plain read (`sum`) and a copy into a preallocated buffer. The weights are cycled through a working set of
about 384 MiB so that no dtype is served from the cache. Takes about a minute. A kernel called alone pays its call
for every product, which the AR's compiled decode step does not: this ranks kernels, `glmimage bench` decides.

    python bench/gemv_probe.py [--threads 2] [--dim 4096] [--mib 384]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=4096, help="N = K of each weight")
    p.add_argument("--mib", type=int, default=384, help="working set per dtype")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n, reps = a.dim, a.reps
    big, dst = torch.randn(a.mib * 2**18), torch.empty(a.mib * 2**18)
    print(f"threads {torch.get_num_threads()}, {n}x{n} weights, {a.mib} MiB per dtype; GB/s of weight read")
    print(f"{'read (sum)':<52}{gbps(lambda w: w.sum(), [big], reps):6.1f}")
    print(f"{'copy (read + write)':<52}{2 * gbps(lambda w: dst.copy_(w), [big], reps):6.1f}")
    compiled = torch.compile(lambda x, w, s: _rowwise(x, w, s), dynamic=False)
    for dt in (torch.float32, torch.bfloat16):
        size = torch.empty(0, dtype=dt).element_size()
        ws = [torch.randn(n, n).to(dt) for _ in range(max(1, a.mib * 2**20 // (n * n * size)))]
        x = torch.randn(1, n).to(dt)
        print(f"{str(dt) + ' F.linear':<52}{gbps(lambda w: F.linear(x, w), ws, reps):6.1f}")
        print(f"{str(dt) + ' torch.mv':<52}{gbps(lambda w: torch.mv(w, x[0]), ws, reps):6.1f}")
        print(f"{str(dt) + ' compiled multiply-reduce':<52}{gbps(lambda w: compiled(x, w, None), ws, reps):6.1f}")
        del ws
    qs = [torch.randint(-127, 128, (n, n), dtype=torch.int8) for _ in range(max(1, a.mib * 2**20 // (n * n)))]
    scale = torch.rand(n)
    for dt in (torch.float32, torch.bfloat16):
        x, s = torch.randn(1, n).to(dt), scale.to(dt)
        label = f"int8, {dt} activations, compiled multiply-reduce"
        print(f"{label:<52}{gbps(lambda w: compiled(x, w, s), qs, reps):6.1f}")
    xb, sb = torch.randn(1, n).to(torch.bfloat16), scale.to(torch.bfloat16)
    label = "int8, bf16 activations, _weight_int8pack_mm"
    print(f"{label:<52}{gbps(lambda w: torch._weight_int8pack_mm(xb, w, sb), qs, reps):6.1f}")


if __name__ == "__main__":
    main()
