"""Weight-only int8 for the linear layers of the AR model and the DiT (gpt-fast style, applied from outside).

Each output row keeps its own scale (symmetric, absmax / 127); activations stay in the pipeline's dtype. On CPU the
matmul runs in `torch._weight_int8pack_mm` (reads the int8 weight directly: a quarter of the fp32 bytes per decoded
token); elsewhere the weight is dequantized on the fly. Measured error against the unquantized layer:
tests/test_engine.py (relative error of a whole AR / DiT forward below 2 %).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_TYPES = ("none", "int8")


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
        if x.device.type == "cpu":
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        else:
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
