"""The one inference entry point: prompt (+ condition images) -> image(s), with stage timings."""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from glmimage.ar import generate as argen
from glmimage.ar.model import ARModel
from glmimage.config import ModelConfig
from glmimage.dit import sample as dsample
from glmimage.dit.model import DiT
from glmimage.glyph import GlyphEncoder
from glmimage.quant import QUANT_TYPES, quantize_int8, use_decode_linears
from glmimage.tokenizer.text import TextTokenizer, find_control_token
from glmimage.tokenizer.vq import VisualTokenizer, preprocess, smart_resize
from glmimage.vae import VAE

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the canonical names (DTYPES also takes fp32 / bf16 / fp16)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "npu", "mps")
STAGES = {"ar": ("ar", "vq"), "dit": ("dit", "glyph", "vae")}  # stage -> the modules it runs
log = logging.getLogger("glmimage")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then npu (torch_npu), then mps, then cpu; explicit names are checked."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)} (optionally with :index)")
    if kind == "npu" or (kind == "auto" and not torch.cuda.is_available()):
        try:
            import torch_npu  # noqa: F401  registers the 'npu' device with torch
        except ImportError:
            if kind == "npu":
                raise ValueError("device 'npu' needs torch_npu installed") from None
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "npu") and torch.npu.is_available():
            return torch.device("npu")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls natively: a CPU with AVX512-BF16 or AMX (an AVX2 CPU emulates them,
    ~80× slower than float32), any accelerator."""
    if torch.device(device).type != "cpu":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Result:
    images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: ar, dit, vae, total
    prior_ids: torch.Tensor | None = None  # (B, th, tw) target-grid ids written by the AR
    peak_memory: dict[str, float] = field(default_factory=dict)  # MiB: per accelerator used, and the host's "cpu"


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: the peak) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_host_memory_mib() -> float:
    """High-water mark of this process's resident memory in MiB: VmHWM on Linux (ru_maxrss is inherited across
    fork + exec, so a child started by a big parent would report the parent's peak), ru_maxrss elsewhere."""
    if (hwm := proc_status_mib("VmHWM")) is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def peak_memory(devices) -> dict[str, float]:
    """Peak memory in MiB: allocated on each CUDA device among `devices`, and the host's resident high-water mark."""
    out = {str(d): torch.cuda.max_memory_allocated(d) / 2**20 for d in set(devices) if d.type == "cuda"}
    out["cpu"] = peak_host_memory_mib()
    return out


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL image or a path to one -> RGB image; unreadable input raises ValueError."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read condition image {image!r}: {e}") from None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (same rounding as diffusers' VaeImageProcessor)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


class Pipeline:
    """Holds every component; `__call__` generates. Build it with `glmimage.load(...)`."""

    def __init__(self, cfg: ModelConfig, *, tokenizer: TextTokenizer, ar: ARModel, vq: VisualTokenizer, dit: DiT,
                 glyph: GlyphEncoder, vae: VAE, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.ar, self._vq, self.dit, self.glyph, self.vae = ar, vq, dit, glyph, vae
        self.vq_factory = None  # set by the loaders: builds the ViT on first use (text-to-image never reads pixels)
        self._active: set[str] = set()  # stages inside `_running`
        self.device, self.dtype = device, dtype
        self.stage_device = {"ar": device, "dit": device}
        self.offload = False  # park idle stages in CPU memory (place(offload=True))
        self.quantization = "none"
        self._decode = argen.decode_one_token  # the AR decode step; compile() swaps in a compiled one

    @property
    def vq(self) -> VisualTokenizer:
        """The visual tokenizer (ViT + VQ), built on first use when the loader deferred it."""
        if self._vq is None:
            parked = self.offload and "ar" not in self._active  # offloaded stages wait in CPU memory
            self._vq = self.vq_factory().to(torch.device("cpu") if parked else self.stage_device["ar"], self.dtype)
        return self._vq

    @vq.setter
    def vq(self, module: VisualTokenizer) -> None:
        self._vq = module

    def modules(self) -> dict[str, torch.nn.Module]:
        """The components that exist now (a deferred visual tokenizer is not built by asking)."""
        mods = {"ar": self.ar, "vq": self._vq, "dit": self.dit, "glyph": self.glyph, "vae": self.vae}
        return {k: m for k, m in mods.items() if m is not None}

    # ---------------------------------------------------------------------------------------------------------
    # Engine options: placement, offload, weight-only int8, compiled decode
    def place(self, *, ar_device: str | torch.device | None = None, dit_device: str | torch.device | None = None,
              offload: bool = False) -> "Pipeline":
        """Put the AR stage (AR + visual tokenizer) and the DiT stage (DiT + glyph encoder + VAE) on their devices.
        offload=True keeps both in CPU memory and moves each stage to its device only while it runs (peak device
        memory: the larger stage instead of both)."""
        for stage, dev in (("ar", ar_device), ("dit", dit_device)):
            if dev is not None:
                self.stage_device[stage] = resolve_device(dev)
        self.offload = offload
        for stage in STAGES:
            self._move(stage, torch.device("cpu") if offload else self.stage_device[stage])
        self._set_ar_dtype()
        return self

    def _move(self, stage: str, device: torch.device) -> None:
        mods = self.modules()
        for name in STAGES[stage]:
            if name in mods:
                mods[name].to(device)

    @contextlib.contextmanager
    def _running(self, stage: str):
        """Bring a stage's modules to its device for the duration of the block (and back to CPU when offloading)."""
        device = self.stage_device[stage]
        if self.offload:
            self._move(stage, device)
        self._active.add(stage)
        try:
            yield device
        finally:
            self._active.discard(stage)
            if self.offload:
                self._move(stage, torch.device("cpu"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def quantize(self, kind: str = "int8") -> "Pipeline":
        """Weight-only int8 for every linear layer of the AR model and the DiT (in place; see glmimage/quant.py).
        The visual tokenizer, glyph encoder and VAE keep their weights (small, and the VAE needs its precision)."""
        if kind not in QUANT_TYPES:
            raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(QUANT_TYPES)}")
        if kind == "int8" and self.quantization != "int8":
            quantize_int8(self.ar)
            quantize_int8(self.dit)
            self.quantization = "int8"
            self._set_ar_dtype()
            if self._decode is not argen.decode_one_token:  # compiled for the float layers: compile anew (the
                torch.compiler.reset()  # reset drops every compiled graph of the process; they recompile on use)
                self.compile()
        return self

    def _set_ar_dtype(self) -> None:
        """An int8 AR on the CPU computes in float32: decoding is memory-bound, so the activations' precision costs
        nothing, and the compiled int8 × float32 product runs twice as fast as int8 × bf16. Elsewhere (and for
        float weights) the AR computes in the pipeline's dtype. The int8 weights are untouched either way."""
        if self.quantization == "int8":
            self.ar.to(torch.float32 if self.stage_device["ar"].type == "cpu" else self.dtype)

    def compile(self) -> "Pipeline":
        """Compile the AR decode step (torch.compile, static shapes, CUDA graphs on CUDA). On the CPU the AR's
        single-row products also compile to fused multiply-reduce loops (glmimage/quant.py: twice the BLAS GEMV's
        bandwidth on this kind of machine), except where they measured slower: on an AVX2-only CPU bf16 keeps the
        BLAS product and an int8 AR is not compiled at all. When compilation fails the first generation logs one
        line and decodes eagerly."""
        if self.stage_device["ar"].type == "cuda":
            self._decode = torch.compile(argen.decode_one_token, mode="reduce-overhead", fullgraph=True,
                                         dynamic=False)
            return self
        avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # measured on an AVX2-only EPYC, `small`, 2 cores
        if avx2 and self.quantization == "int8":  # the compiled int8 product: 10-12 tok/s, eager's int8 kernel 50
            log.info("int8 AR on an AVX2 CPU: the eager int8 kernel decodes 4x faster than the compiled product; "
                     "not compiling the AR")
            self._decode = argen.decode_one_token
            return self
        if not (avx2 and self.dtype == torch.bfloat16):  # bf16 on AVX2: BLAS's GEMV in the graph, 59-65 tok/s vs 54
            use_decode_linears(self.ar)
        # Dynamo re-checks ~2,400 guards before every step (0.6 ms a token at `small`, 6 % of it), most on module
        # attributes. Only the guards on tensors are kept (0.09 ms): dtype, device, shape and strides of every
        # input, parameter and cache buffer, so another dtype, device, batch or cache length recompiles. Modules
        # swapped after compiling are not seen: quantize() recompiles, hooks added later do not run when compiled.
        self._decode = torch.compile(argen.decode_one_token, fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
        return self

    def _generate_tokens(self, layouts: list, **kw) -> torch.Tensor:
        if self._decode is argen.decode_one_token:
            return argen.generate(self.ar, layouts, decode=self._decode, **kw)
        try:
            return argen.generate(self.ar, layouts, decode=self._decode, **kw)
        except (ValueError, torch.OutOfMemoryError):
            raise  # bad input or memory: not the compiler's fault, eager would fail the same way
        except Exception as e:  # noqa: BLE001  a compiler failure of any kind: fall back, loudly, once
            log.warning("torch.compile of the AR decode step failed (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._decode = argen.decode_one_token
            return argen.generate(self.ar, layouts, decode=self._decode, **kw)

    def _sync(self) -> None:
        for dev in set(self.stage_device.values()):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def _peak_memory(self) -> dict[str, float]:
        return peak_memory(self.stage_device.values())

    # ---------------------------------------------------------------------------------------------------------
    def validate(self, prompts: list[str], height: int, width: int, steps: int,
                 negative_prompt: str | None = None) -> None:
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a non-empty list of non-empty strings)")
        for text in prompts + [negative_prompt or ""]:
            if (tok := find_control_token(text)) is not None:
                raise ValueError(f"prompt contains the control token {tok!r}, which would be read as layout; "
                                 "remove it")
        s = self.cfg.stride
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < s or v % s:
                raise ValueError(f"{name} must be a positive multiple of the model's token stride {s} px, got {v}")
        if max(height, width) / min(height, width) > 4:
            raise ValueError(f"aspect ratio must be at most 4:1, got {width}x{height}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")

    def _check_prior_ids(self, ids, b: int, target: tuple[int, int]) -> torch.Tensor:
        """A given target grid -> (B, th, tw) int64, or ValueError naming the shape and range the model needs."""
        ids = torch.as_tensor(ids)
        th, tw = target
        if ids.dim() == 2:
            ids = ids.expand(b, th, tw) if ids.shape == (th, tw) else ids
        if ids.shape != (b, th, tw) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"prior_ids must be integer ids of shape ({b}, {th}, {tw}) or ({th}, {tw}) for this "
                             f"size, got {tuple(ids.shape)} {ids.dtype}")
        n = self.cfg.vq.codebook_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"prior_ids must lie in [0, {n}) (the codebook), got {int(ids.min())} … {int(ids.max())}")
        return ids.long()

    @torch.no_grad()
    def condition_tokens(self, image: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        """Resize a condition image to what both the tokenizer and the VAE see; -> (image, VQ ids (h, w))."""
        h, w = smart_resize(image.height, image.width, self.cfg.vq)
        d = self.cfg.vq.downsample
        if (image.height, image.width) != (h * d, w * d):  # keep the VQ grid and the latent grid aligned
            image = image.resize((w * d, h * d), Image.LANCZOS)
        pixels = preprocess(image, self.cfg.vq).to(self.stage_device["ar"], self.dtype)
        return image, self.vq.encode(pixels)[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], images: list | None = None, *, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | list[int] = 0, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, greedy: bool = False,
                 negative_prompt: str | None = None, prior_ids: torch.Tensor | None = None,
                 ar_guidance_scale: float | None = None, progress: bool = True) -> Result:
        """Generate one image per prompt. images: condition images (PIL or paths) shared by every prompt.

        seed: one seed for the batch (one generator drawn row after row, like diffusers), or one seed per prompt
        (each row then gives the image it would give alone: what a server batching requests needs).
        negative_prompt: the unconditional branch's glyph text (its quoted strings), instead of none.
        prior_ids: the target grid to paint, (B, th, tw) or (th, tw) for every prompt, instead of sampling it with
        the AR (the reference pipeline's `prior_token_ids`): a plan edited by hand, or the true ids of a scene.
        ar_guidance_scale: classifier-free guidance of the AR's logits against the same prompt with the caption left
        out (LlamaGen); 1 (the default) is none, as GLM-Image. For models trained with caption dropout."""
        sc = self.cfg.sampling
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = sc.height if height is None else height
        width = sc.width if width is None else width
        steps = sc.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = sc.guidance_scale if guidance_scale is None else guidance_scale
        self.validate(prompts, height, width, steps, negative_prompt)
        ar_guidance = sc.ar_guidance_scale if ar_guidance_scale is None else ar_guidance_scale
        if not (isinstance(ar_guidance, (int, float)) and math.isfinite(ar_guidance) and ar_guidance >= 0):
            raise ValueError(f"ar_guidance_scale must be a finite number >= 0 (1 = no AR guidance), got {ar_guidance}")
        if isinstance(seed, list) and len(seed) != len(prompts):
            raise ValueError(f"got {len(seed)} seeds for {len(prompts)} prompts; give one seed or one per prompt")
        conds = [load_image(im) for im in (images or [])]
        for dev in set(self.stage_device.values()):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        t_start = time.perf_counter()
        b = len(prompts)

        # 1. AR: condition images -> VQ ids in the prompt; write the preview grid (text-to-image) then the target grid
        target, preview = self.cfg.grids(height, width)
        if prior_ids is not None:
            prior_ids = self._check_prior_ids(prior_ids, b, target)
        # a given plan without condition images needs neither the AR nor the visual tokenizer: under offload they
        # stay where they are instead of a round trip to the device
        needs_ar = prior_ids is None or bool(conds)
        with self._running("ar") if needs_ar else contextlib.nullcontext(self.stage_device["ar"]) as dev:
            cond_tokens = [self.condition_tokens(im) for im in conds]
            cond_ids = [ids for _, ids in cond_tokens]
            if prior_ids is not None:  # the plan is given: the AR does not run
                grid = prior_ids.to(dev)
            else:
                cond_grids = [(ids.flatten(), *ids.shape) for ids in cond_ids]
                layouts = [argen.layout_prompt(self.tokenizer, p, target=target, preview=None if conds else preview,
                                               cond=cond_grids) for p in prompts]
                n_new = layouts[0].num_new
                uncond = None  # AR guidance: the same layout with the caption left out (caption dropout's rows)
                if ar_guidance != 1.0:
                    uncond = [argen.layout_prompt(self.tokenizer, "", target=target,
                                                  preview=None if conds else preview, cond=cond_grids)] * b
                with tqdm(total=n_new, desc="AR tokens", disable=not progress, leave=False) as bar:
                    tokens = self._generate_tokens(
                        layouts, codebook_size=self.cfg.vq.codebook_size, pad_id=self.tokenizer.pad_id,
                        temperature=sc.temperature if temperature is None else temperature,
                        top_p=sc.top_p if top_p is None else top_p, top_k=sc.top_k if top_k is None else top_k,
                        greedy=greedy, generator=_generators(seed, dev), progress=bar,
                        guidance=ar_guidance, uncond=uncond)
                th, tw = target
                grid = tokens[:, n_new - th * tw:].view(b, th, tw)  # the preview grid is discarded
            self._sync()
        t_ar = time.perf_counter()

        # 2. DiT: flow matching on VAE latents, prior = target grid upsampled ×2, CFG in one batched call
        with self._running("dit") as dev:
            latents = self._denoise(prompts, [im for im, _ in cond_tokens], cond_ids, grid.to(dev), height=height,
                                    width=width, steps=steps, guidance=guidance, seed=seed,
                                    negative_prompt=negative_prompt or "", progress=progress)
            self._sync()
            t_dit = time.perf_counter()

            # 3. VAE decode
            out = to_pil(self.vae.decode(latents))
            self._sync()
        t_end = time.perf_counter()
        timings = {"ar": t_ar - t_start, "dit": t_dit - t_ar, "vae": t_end - t_dit, "total": t_end - t_start}
        return Result(images=out, timings=timings, prior_ids=grid.cpu(), peak_memory=self._peak_memory())

    def _denoise(self, prompts: list[str], cond_images: list[Image.Image], cond_ids: list[torch.Tensor],
                 grid: torch.Tensor, *, height: int, width: int, steps: int, guidance: float, seed: int | list[int],
                 negative_prompt: str, progress: bool) -> torch.Tensor:
        """Guided Euler sampling of the DiT -> latents (B, C, H/f, W/f) float32. grid: (B, th, tw) AR ids."""
        dev, b = self.stage_device["dit"], len(prompts)
        prior = upsample_ids(grid)
        glyph, glyph_mask = self.glyph.encode(prompts)
        f = self.cfg.vae_factor
        shape = (self.cfg.dit.in_channels, height // f, width // f)
        if isinstance(seed, list):
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed]).to(dev)
        else:
            noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed)).to(dev)
        cond_kv = None
        if cond_images:
            lat = [self.vae.encode(pil_to_tensor(im).to(dev)).to(self.dtype) for im in cond_images]
            cond_kv = self.dit.condition_kv(lat, [upsample_ids(ids[None].to(dev)) for ids in cond_ids],
                                            [(im.height, im.width) for im in cond_images])
        neg = self.glyph.encode([negative_prompt] * b) if guidance > 1.0 else (None, None)
        canvas = None
        if self.cfg.dit.canvas_patch:  # the world model's canvas, laid out from the plan
            from glmimage.world.canvas import plan_canvases

            source = (cond_images[0], cond_ids[0]) if cond_images else (None, None)  # the image edited, if any
            canvas = plan_canvases(prompts, grid, height, width, self.cfg.dit.canvas_channels,
                                   *source).to(dev, self.dtype)
        with tqdm(total=steps, desc="DiT steps", disable=not progress, leave=False) as bar:
            return dsample.generate_latents(self.dit, noise, prior=prior, glyph=glyph, glyph_mask=glyph_mask,
                                            size=(height, width), steps=steps, guidance=guidance,
                                            schedule=self.cfg.schedule, neg_glyph=neg[0], neg_mask=neg[1],
                                            cond_kv=cond_kv, canvas=canvas, dtype=self.dtype, progress=bar)


def _generators(seed: int | list[int], device: torch.device) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, list):
        return [torch.Generator(device).manual_seed(s) for s in seed]
    return torch.Generator(device).manual_seed(seed)


def upsample_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, h, w) token grid -> nearest ×2 -> (B, 2h*2w) DiT prior ids (raster order)."""
    return ids.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1)[None] * 2 - 1).contiguous()


