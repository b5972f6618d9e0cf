"""LoRA adapters for the AR model and the DiT, through peft.

An adapter file is safetensors: tensors `ar.<peft key>` / `dit.<peft key>` (peft's own names, adapter name
stripped) and the metadata entry `glmimage_lora` (JSON: rank, alpha, the target pattern per component, the base
model). At inference `apply(pipe, ["a.safetensors:0.8", ...])` merges each adapter into the weights, scaled
(W += scale · alpha/rank · B·A): no per-token cost, and int8 / compile apply to the merged weights afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

COMPONENTS = ("ar", "dit")
# Every attention projection and MLP matrix of every block (what LoRA papers adapt); embeddings, norms, the AR
# head and the DiT's adaLN / embedders stay frozen.
TARGETS = {
    "ar": r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate_up|down)_proj)",
    "dit": r".*blocks\.\d+\.((q|k|v|o)_proj|mlp\.fc[12])",
}
META_KEY = "glmimage_lora"


def _config(component: str, rank: int, alpha: float):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS[component], lora_dropout=0.0,
                      init_lora_weights=True)


def add(module: nn.Module, component: str, rank: int, alpha: float, name: str = "default") -> list[nn.Parameter]:
    """Inject a LoRA adapter into `module` in place; freeze everything else. -> the adapter's parameters."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(_config(component, rank, alpha), module, adapter_name=name)
    params = []
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n and f".{name}." in n)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"no layer of the {component} matched the LoRA targets {TARGETS[component]!r}")
    return params


def adapter_state(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's adapter tensors (adapter name stripped) out of a full state dict of `module`."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in
            get_peft_model_state_dict(module, state_dict=state_dict, adapter_name="default").items()}


def save(path: str | Path, tensors: dict[str, dict[str, torch.Tensor]], *, rank: int, alpha: float,
         base_model: str) -> Path:
    """Write an adapter file: tensors per component ("ar" / "dit")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{c}.{k}": v.detach().cpu().contiguous() for c, sd in tensors.items() for k, v in sd.items()}
    meta = {"rank": rank, "alpha": alpha, "components": sorted(tensors), "targets": {c: TARGETS[c] for c in tensors},
            "base_model": base_model}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta), "format": "pt"})
    tmp.replace(path)
    return path


def read(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """-> (metadata, {component: peft tensors}). ValueError for anything that is not a glmimage adapter."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA adapter not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  OSError, JSON errors, safetensors' own error for a corrupt header
        raise ValueError(f"{path}: not a safetensors adapter ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("rank"), int) or \
            not set(meta.get("components", [])) <= set(COMPONENTS):
        raise ValueError(f"{path}: not a glmimage LoRA adapter (no valid '{META_KEY}' metadata)")
    tensors = {c: {k[len(c) + 1:]: v for k, v in flat.items() if k.startswith(c + ".")} for c in meta["components"]}
    return meta, tensors


def parse_spec(spec: str) -> tuple[Path, float]:
    """'path' or 'path:scale' -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not scale.startswith(("\\", "/")):
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


@torch.no_grad()
def merge_into(module: nn.Module, component: str, meta: dict, tensors: dict[str, torch.Tensor],
               scale: float) -> None:
    """Add scale · (alpha/rank) · B·A of one adapter into `module`'s weights, in place; the module keeps its plain
    nn.Linear layers (peft's merge_and_unload)."""
    from peft import LoraModel, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    cfg = _config(component, meta["rank"], meta["alpha"])
    lm = LoraModel(module, cfg, "merge")
    result = set_peft_model_state_dict(module, tensors, adapter_name="merge")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        lm.unload()
        raise ValueError(f"the adapter's {component} tensors do not fit this model (missing {missing[:2]}, "
                         f"unexpected {list(result.unexpected_keys)[:2]}): was it trained on another base model?")
    for m in module.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("merge", scale)
    lm.merge_and_unload(adapter_names=["merge"])


def apply(pipe, specs: list[str]) -> list[str]:
    """Merge adapters ('path[:scale]') into a pipeline's AR / DiT weights. -> one description line per adapter."""
    lines = []
    for spec in specs:
        path, scale = parse_spec(spec)
        meta, tensors = read(path)
        for component, sd in tensors.items():
            merge_into(getattr(pipe, component), component, meta, sd, scale)
        lines.append(f"LoRA {path.name} ×{scale:g} (rank {meta['rank']}, {'+'.join(meta['components'])})")
    return lines
