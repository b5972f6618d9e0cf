"""`glmimage bench`: glmimage and the reference `GlmImagePipeline` (transformers + diffusers) on the same random
weights, side by side in one run, each against the machine's physical limit.

The parent builds one random-weight model of the named size, saves it in both layouts, measures the machine (copy
bandwidth, matmul rate per dtype) and counts the DiT's FLOPs per step; then every engine variant runs in its own
subprocess (clean peak memory, no shared caches): load, one warm-up generation at the same size (compilation, cache
allocation), one timed generation. Roofline: AR decode is memory-bound, so its limit is bandwidth ÷ bytes read per
token (weights other than the embedding table, plus the KV cache); the DiT is compute-bound, so its limit is matmul
rate ÷ FLOPs per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmimage.pipeline import DTYPE_NAMES, proc_status_mib, resolve_dtype

PROMPT = "A photo of a red circle next to a sign that says 'HELLO', on a blue background"
SIZES = ("debug", "small", "glm-image")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One engine to time: 'ours' or 'ref', a compute dtype, and (ours only) int8 weights."""
    impl: str
    dtype: str
    int8: bool = False

    @classmethod
    def parse(cls, text: str) -> "Variant":
        impl, _, rest = text.partition(":")
        dtype, _, quant = rest.partition("+")
        if impl not in ("ours", "ref") or dtype not in DTYPE_NAMES or quant not in ("", "int8"):
            raise ValueError(f"bad variant {text!r}; valid: ours|ref ':' {'|'.join(DTYPE_NAMES)} ['+int8'], "
                             "e.g. ours:bfloat16+int8")
        if impl == "ref" and quant:
            raise ValueError("the reference has no int8 mode; int8 is for 'ours' variants")
        return cls(impl, dtype, quant == "int8")

    def __str__(self) -> str:
        return f"{self.impl}:{self.dtype}{'+int8' if self.int8 else ''}"


DEFAULT_VARIANTS = "ref:float32,ours:float32,ours:float32+int8,ref:bfloat16,ours:bfloat16,ours:bfloat16+int8"


# ---------------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """STREAM-style copy: (bytes read + bytes written) / s of the best of `repeats` tensor copies."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` square n×n matmuls in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def dit_flops_per_step(pipe, height: int, width: int, guidance: bool = True) -> float:
    """FLOPs of one denoising step (both guidance branches), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.cfg
    f, p = cfg.vae_factor, cfg.dit.patch_size
    b = 2 if guidance else 1
    glyph, mask = pipe.glyph.encode([PROMPT] * b)
    x = torch.zeros(b, cfg.dit.in_channels, height // f, width // f)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.dit(x, torch.full((b,), 500.0), prior_ids=torch.zeros(b, (height // f // p) * (width // f // p),
                                                                   dtype=torch.long),
                 prior_drop=torch.zeros(b, dtype=torch.bool), glyph=glyph, glyph_mask=mask,
                 target_size=torch.tensor([[float(height), float(width)]] * b))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# Workers (one subprocess per variant)
# ---------------------------------------------------------------------------------------------------------------
def _rss_mib() -> float:
    """Resident memory now, in MiB, after importing everything either engine imports (a fair baseline)."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, GlmImagePipeline  # noqa: F401
    from transformers import GlmImageForConditionalGeneration, T5EncoderModel  # noqa: F401

    import glmimage  # noqa: F401

    return proc_status_mib("VmRSS") or 0.0


def _peak(device: torch.device) -> float:
    from glmimage.pipeline import peak_host_memory_mib

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_host_memory_mib()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(folder: Path, v: Variant, job: dict) -> dict:
    import glmimage
    from glmimage.quant import weight_bytes

    base = _rss_mib()
    pipe = glmimage.load(folder, device="cpu", dtype=v.dtype)
    if v.int8:
        pipe.quantize("int8")
    device = torch.device(job["device"])
    pipe.place(ar_device=device, dit_device=device)
    if job["compile"]:
        pipe.compile()
    kw = dict(height=job["height"], width=job["width"], guidance_scale=1.5, seed=0, progress=False)
    pipe(PROMPT, num_inference_steps=1, **kw)  # warm-up: compilation, caches, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = pipe(PROMPT, num_inference_steps=job["steps"], **kw)
    t = out.timings
    return dict(ar_s=t["ar"], dit_s=t["dit"], vae_s=t["vae"], total_s=t["total"], tokens=int(out.prior_ids[0].numel()
                + _preview_tokens(pipe.cfg, job)), ar_weight_bytes=weight_bytes(pipe.ar, skip=("embed_tokens",)),
                kv_bytes_per_value=pipe.ar.layers[0].self_attn.kv_cache.k.element_size(),
                peak_mib=_peak(device) - (0 if device.type == "cuda" else base))


def _preview_tokens(cfg, job: dict) -> int:
    _, (ph, pw) = cfg.grids(job["height"], job["width"])
    return ph * pw


def run_reference(folder: Path, v: Variant, job: dict) -> dict:
    from diffusers import GlmImagePipeline

    base = _rss_mib()
    dtype = resolve_dtype(v.dtype)
    device = torch.device(job["device"])
    pipe = GlmImagePipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    clock = {"ar": 0.0, "dit": 0.0, "vae": 0.0, "tokens": 0}

    def timed(key, fn, count=None):
        def wrapper(*args, **kwargs):
            _sync(device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            clock[key] += time.perf_counter() - t
            if count is not None:
                clock["tokens"] += count(out, kwargs)
            return out
        return wrapper

    vle = pipe.vision_language_encoder
    vle.generate = timed("ar", vle.generate, lambda out, kw: out.shape[1] - kw["input_ids"].shape[1])
    pipe.transformer.forward = timed("dit", pipe.transformer.forward)
    pipe.vae.decode = timed("vae", pipe.vae.decode)
    kw = dict(height=job["height"], width=job["width"], guidance_scale=1.5,
              generator=torch.Generator(device).manual_seed(0))
    pipe(prompt=PROMPT, num_inference_steps=1, **kw)
    clock.update(ar=0.0, dit=0.0, vae=0.0, tokens=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    pipe(prompt=PROMPT, num_inference_steps=job["steps"], **kw)
    _sync(device)
    total = time.perf_counter() - t
    lm = vle.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    weights += sum(p.numel() * p.element_size() for p in vle.lm_head.parameters())
    return dict(ar_s=clock["ar"], dit_s=clock["dit"], vae_s=clock["vae"], total_s=total, tokens=clock["tokens"],
                ar_weight_bytes=weights, kv_bytes_per_value=torch.finfo(dtype).bits // 8,
                peak_mib=_peak(device) - (0 if device.type == "cuda" else base))


# ---------------------------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------------------------
def bench_config(size: str):
    from glmimage.config import preset

    cfg = preset(size)
    # the reference hard-codes a 16-side preview grid: the debug preset's own (4) would not be comparable
    return dataclasses.replace(cfg, preview_side=16)


def prepare(size: str, folder: Path, height: int, width: int) -> dict:
    """Build the random-weight model once, save it in both layouts -> facts of the model (FLOPs, sizes)."""
    import glmimage
    from glmimage.checkpoint import build
    from glmimage.dit.model import fill_zero_params
    from glmimage.tokenizer.text import TextTokenizer

    cfg = bench_config(size)
    pipe = build(cfg, TextTokenizer.byte_level(cfg.vq.codebook_size), device="cpu", seed=0)
    fill_zero_params(pipe.dit, std=0.02)  # training init zeroes the DiT's gates and output: make real work
    glmimage.save(pipe, folder / "ours")
    glmimage.export_official(pipe, folder / "official")
    from glmimage.ar.generate import layout_prompt

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    target, preview = cfg.grids(height, width)
    lay = layout_prompt(pipe.tokenizer, PROMPT, target=target, preview=preview)
    a = cfg.ar
    return dict(dit_flops_per_step=dit_flops_per_step(pipe, height, width), prompt_tokens=int(lay.ids.numel()),
                grid_tokens=lay.num_new, kv_values_per_position=2 * a.n_layers * a.n_kv_heads * a.head_dim,
                params={"ar": count(pipe.ar), "dit": count(pipe.dit), "vq": count(pipe.vq),
                        "glyph": count(pipe.glyph), "vae": count(pipe.vae)})


def run(size: str = "small", *, variants: list[Variant], height: int = 256, width: int = 256, steps: int = 8,
        device: str = "cpu", compile: bool = False, out: str | Path = "runs/bench", progress: bool = True) -> dict:
    """Run every variant in its own process on the same weights -> report (also written to <out>/bench.json)."""
    from glmimage.pipeline import resolve_device

    if size not in SIZES:
        raise ValueError(f"unknown bench size {size!r}; valid: {', '.join(SIZES)}")
    dev = resolve_device(device)
    if size == "glm-image" and dev.type == "cpu":
        raise ValueError("the official size (17 B parameters) needs a GPU with about 80 GB; on a CPU use debug or "
                         "small")
    if not variants:
        raise ValueError("give at least one variant")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"device": str(dev), "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__,
               "copy_bandwidth_gbs": copy_bandwidth() / 1e9 if dev.type == "cpu" else _gpu_bandwidth(dev) / 1e9}
    rate = (lambda dt: matmul_rate(dt)) if dev.type == "cpu" else (lambda dt: _gpu_matmul(dev, dt))
    machine["matmul_tflops"] = {d: rate(resolve_dtype(d)) / 1e12
                                for d in sorted({v.dtype for v in variants})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        facts = prepare(size, Path(tmp), height, width)
        job = dict(height=height, width=width, steps=steps, device=str(dev), compile=compile)
        for v in variants:
            if progress:
                print(f"  running {v} ...", file=sys.stderr, flush=True)
            folder = Path(tmp) / ("ours" if v.impl == "ours" else "official")
            cmd = [sys.executable, "-m", "glmimage.bench", "--worker", str(v), "--folder", str(folder),
                   "--job", json.dumps(job)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"bench worker {v} ran over an hour") from None
            if proc.returncode != 0:
                raise RuntimeError(f"bench worker {v} failed:\n{proc.stderr[-3000:]}")
            rows.append({"variant": str(v), **json.loads(proc.stdout.strip().splitlines()[-1])})
    bw = machine["copy_bandwidth_gbs"] * 1e9
    for r in rows:
        v = Variant.parse(r["variant"])
        r["ar_tokens_per_s"] = r["tokens"] / r["ar_s"]
        r["dit_s_per_step"] = r["dit_s"] / steps
        # bytes read per decoded token: the weights, and the KV cache at its mean length over the decode
        kv = facts["kv_values_per_position"] * r["kv_bytes_per_value"]  # the cache's real dtype
        r["ar_bytes_per_token"] = r["ar_weight_bytes"] + kv * (facts["prompt_tokens"] + facts["grid_tokens"] / 2)
        r["ar_limit_tokens_per_s"] = bw / r["ar_bytes_per_token"]
        r["ar_fraction_of_limit"] = r["ar_tokens_per_s"] / r["ar_limit_tokens_per_s"]
        r["dit_limit_s_per_step"] = facts["dit_flops_per_step"] / (machine["matmul_tflops"][v.dtype] * 1e12)
        r["dit_fraction_of_limit"] = r["dit_limit_s_per_step"] / r["dit_s_per_step"]
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        v = Variant.parse(r["variant"])
        for key, ref in (("vs_ref_same_dtype", f"ref:{v.dtype}"), ("vs_ref_float32", "ref:float32")):
            if v.impl == "ours" and ref in by_name:
                b = by_name[ref]
                r[key] = {"ar": r["ar_tokens_per_s"] / b["ar_tokens_per_s"], "dit": b["dit_s"] / r["dit_s"],
                          "vae": b["vae_s"] / r["vae_s"], "total": b["total_s"] / r["total_s"],
                          "peak_memory": r["peak_mib"] / b["peak_mib"]}
    report = dict(size=size, height=height, width=width, steps=steps, compile=compile, machine=machine,
                  model=facts, rows=rows)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"glmimage bench — size {report['size']}, {report['width']}x{report['height']}, {report['steps']} steps, "
             f"guidance 1.5, {m['device']} ({m['cpu']}, {m['threads']} threads, torch {m['torch']})",
             f"machine: copy bandwidth {m['copy_bandwidth_gbs']:.1f} GB/s; matmul "
             + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in m["matmul_tflops"].items()),
             "",
             "| engine | AR tok/s (% of limit) | DiT s/step (% of limit) | VAE s | end to end s | peak MiB | "
             "× ref same dtype (AR / DiT / total) | × ref fp32 (total) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        same = r.get("vs_ref_same_dtype")
        fp32 = r.get("vs_ref_float32")
        lines.append(
            f"| {r['variant']} | {r['ar_tokens_per_s']:.1f} ({100 * r['ar_fraction_of_limit']:.0f} %) | "
            f"{r['dit_s_per_step']:.3f} ({100 * r['dit_fraction_of_limit']:.0f} %) | {r['vae_s']:.2f} | "
            f"{r['total_s']:.2f} | {r['peak_mib']:.0f} | "
            + (f"{same['ar']:.2f} / {same['dit']:.2f} / {same['total']:.2f}" if same else "—") + " | "
            + (f"{fp32['total']:.2f}" if fp32 else "—") + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _gpu_bandwidth(dev: torch.device, nbytes: int = 2**30) -> float:
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize(dev)
    return 2 * nbytes * 10 / (time.perf_counter() - t)


def _gpu_matmul(dev: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(dev)
    return 2 * n**3 * 10 / (time.perf_counter() - t)


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--job", required=True)
    a = p.parse_args(argv)
    v = Variant.parse(a.worker)
    fn = run_ours if v.impl == "ours" else run_reference
    print(json.dumps(fn(Path(a.folder), v, json.loads(a.job))))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _worker_main(sys.argv[1:])
