"""Inference weight formats, applied from outside the models: weight-only int8, and single-row linears that
compile to a fused multiply-reduce.

int8 (gpt-fast style): each output row keeps its own scale (symmetric, absmax / 127); activations stay in the
pipeline's dtype. Measured error against the unquantized layer: relative error of a whole AR / DiT forward about
1 % (tests/test_engine.py bounds it at 2 %).

Single-row products (the AR's decode step) are memory-bound: the time is the weight bytes read. On CPUs, the
BLAS single-row GEMM runs on one thread at about half the memory bandwidth; the same product written as
(W · x).sum(-1) compiles (inductor) to one fused, vectorised loop parallel over output rows that reads W once at
the full bandwidth. The eager path keeps F.linear (the multiply-reduce would materialise W · x).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_TYPES = ("none", "int8")


def _single_row(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def _rowwise(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) holding a few rows R, w (N, K) float or int8 -> x·Wᵀ (..., N), accumulated in float32."""
    y = (w.float() * x.reshape(-1, 1, x.shape[-1]).float()).sum(-1)  # (R, N)
    if scale is not None:
        y = y * scale.float()
    return y.to(x.dtype).view(*x.shape[:-1], -1)


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters) whose single-row products compile to the fused multiply-reduce."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "DecodeLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _single_row(x):
            y = _rowwise(x, self.weight, None)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(module: nn.Module) -> int:
    """Swap every plain nn.Linear under `module` for a DecodeLinear sharing its parameters -> layers swapped."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, DecodeLinear.from_linear(child))
            n += 1
        else:
            n += use_decode_linears(child)
    return n


class Int8Linear(nn.Module):
    """y = x · (W_int8 · scale)ᵀ + b, with W_int8 (out, in) and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype,
                device=lin.weight.device)
        q.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        q.scale.copy_(scale)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.compiler.is_compiling() and rows <= 16:
            # decoding a batch: the fused multiply-reduce (inductor has no lowering for the int8 kernel's
            # converted input; before this a compiled batched int8 decode fell back to eager)
            y = _rowwise(x, self.weight, self.scale)
        elif x.device.type == "cpu" and rows <= 16:
            # the int8 CPU kernel is fast for a few rows of 16-bit activations (and ~10× slower with float32)
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight,
                                          self.scale.to(torch.bfloat16)).to(x.dtype).view(*shape[:-1], -1)
        else:  # many rows (prefill, the DiT): compute-bound, dequantize and use the dense kernels
            y = F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by an Int8Linear in place -> number of layers replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            n += 1
        else:
            n += quantize_int8(child)
    return n


def weight_bytes(module: nn.Module, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes of parameters and weight buffers under `module` (names starting with `skip` left out)."""
    tensors = {**dict(module.named_parameters()), **{k: v for k, v in module.named_buffers() if
                                                      k.endswith(("weight", "scale", "bias"))}}
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith(skip))
