"""Loop helpers shared by the training stages: config, schedule, resumable state, logs, plots.

Each stage is one linear `main(cfg)` in its own module; this file only holds what every stage repeats.

Resumability: the batch and every random draw of step `s` come from a generator seeded with (seed, s), so a run that
resumes from step s replays exactly the losses an uninterrupted run would have seen. The checkpoint holds the
model(s), the optimizer (safetensors + JSON, never pickle), the step and the global RNG states, written atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from glmimage.checkpoint import _tie_t5, atomic_folder, model_folder, read_safetensors, recover_folder
from glmimage.pipeline import native_bf16

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Knobs every stage has; stages subclass it with their own fields."""
    out: str = "runs/world"  # run folder; each stage writes out/<stage>/
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # bf16 autocast, fp32 master weights and loss. None: on where the device computes bf16 natively (CUDA, NPU, CPUs
    # with AVX512-BF16 or AMX: 2.2× faster than fp32), off elsewhere (an AVX2 CPU emulates bf16 matmuls, ~80× slower)
    bf16: bool | None = None
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 100
    threads: int = 0  # torch threads; 0 = leave the default
    # a glmimage model folder (what `train assemble` writes) whose weights a stage starts from when it has no
    # checkpoint yet, with a fresh optimizer and schedule: a run continued from a model, not from a checkpoint
    init: str = ""

    @property
    def total_steps(self) -> int:
        """Every step the stage runs (a stage with a second leg after `steps` counts it)."""
        return self.steps

    def with_overrides(self, **kw):
        names = {f.name for f in fields(self)}
        bad = sorted(set(kw) - names)
        if bad:
            raise ValueError(f"unknown option(s) {bad} for {type(self).__name__}; valid: {sorted(names)}")
        return replace(self, **kw)


def lr_at(step: int, cfg: StageConfig, steps: int | None = None) -> float:
    """Linear warmup then cosine decay to 10 % of the peak at `steps` (default cfg.steps)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, (cfg.steps if steps is None else steps) - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one step: batches and noise are a pure function of (seed, step), so resuming is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7 + stream) % (2**63))


def autocast(enabled: bool | None, device: str = "cpu"):
    """bf16 autocast when `enabled` (None: when the device computes bf16 natively), else a no-op context."""
    if enabled is None:
        enabled = native_bf16(device)
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def forward(enabled: bool | None, device: str = "cpu"):
    """The context of a training forward: `autocast(enabled, device)` and, on a CPU, the math attention kernel.

    At our sequence lengths (16-144 tokens) the backward of the CPU's fused (flash) attention kernel costs many times
    its forward; with the math kernel (matmuls and a softmax, whose backward autograd derives) the ViT's step is
    2.5-3x faster and the AR's and the DiT's attention calls 5-40 %, same losses to rounding (bench/train_attention.py,
    README "Training speed: the attention kernel"). The kernel is chosen at the forward; the backward follows it."""
    stack = contextlib.ExitStack()
    stack.enter_context(autocast(enabled, device))
    if device == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def make_optimizer(params, cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or gains)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: <stage dir>/ckpt/{model.safetensors, optim.safetensors, state.json}
# ---------------------------------------------------------------------------------------------------------------
def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = []
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            meta["state"][str(pid)].append(k)
    return tensors, meta


def save_checkpoint(stage_dir: Path, models: dict[str, nn.Module], opt: torch.optim.Optimizer, step: int,
                    extra: dict | None = None) -> None:
    """Atomically replace stage_dir/ckpt with the models, the optimizer, the step and the RNG states."""
    with atomic_folder(stage_dir / "ckpt") as tmp:
        weights, aliases, seen = {}, {}, {}
        for name, m in models.items():
            for k, v in m.state_dict().items():
                key = f"{name}.{k}"
                ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
                if ptr in seen:  # tied weights (T5's embed_tokens is shared.weight): stored once
                    aliases[key] = seen[ptr]
                    continue
                seen[ptr] = key
                weights[key] = v.detach().cpu().contiguous()
        save_file(weights, str(tmp / "model.safetensors"))
        otensors, ometa = _optim_tensors(opt)
        save_file(otensors or {"_empty": torch.zeros(1)}, str(tmp / "optim.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "aliases": aliases, "optim": ometa, "python_rng": _jsonable(random.getstate()),
                 "numpy_rng": _jsonable(np.random.get_state()), "extra": extra or {}, "time": time.time()}
        (tmp / "state.json").write_text(json.dumps(state))


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x


def load_checkpoint(stage_dir: Path, models: dict[str, nn.Module], opt: torch.optim.Optimizer | None) -> dict | None:
    """Restore what save_checkpoint wrote; returns the state dict (step, extra) or None when there is none."""
    ck = stage_dir / "ckpt"
    recover_folder(ck)
    if not (ck / "state.json").is_file():
        return None
    state = json.loads((ck / "state.json").read_text())
    weights = load_file(str(ck / "model.safetensors"))
    for alias, key in state.get("aliases", {}).items():
        weights[alias] = weights[key]
    for name, m in models.items():
        sub = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        try:
            m.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{ck} was written by a different model config ({str(e).splitlines()[1].strip()}); "
                             f"remove it to start over, or use another --out") from None
    if opt is not None:
        ot = load_file(str(ck / "optim.safetensors"))
        meta = state["optim"]
        sd = {"param_groups": meta["param_groups"],
              "state": {int(pid): {k: ot[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state"].items()}}
        opt.load_state_dict(sd)
    torch.set_rng_state(load_file(str(ck / "rng.safetensors"))["torch_rng"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = state["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
    return state


def init_from(cfg: StageConfig, stage_dir: Path, models: dict[str, nn.Module],
              missing_ok: tuple[str, ...] = ()) -> None:
    """Load cfg.init's weights into models {component of the model folder: module}, in place. A no-op without
    init or once the stage has its own checkpoint (which load_checkpoint then restores): only a new run reads it.
    missing_ok: parameter names (within a module) that the folder may lack, or hold with fewer input columns (a
    canvas embedder that reads fewer channels); what it lacks keeps its initial values."""
    if not cfg.init or (stage_dir / "ckpt" / "state.json").is_file():
        return
    weights = model_folder(cfg.init) / "model.safetensors"  # `world`: the embedded model
    if not weights.is_file():
        raise ValueError(f"init={cfg.init!r} is not a glmimage model folder (no {weights})")
    flat = read_safetensors([weights], keep=lambda k: k.partition(".")[0] in models,
                            cast=lambda k, t: t.float() if t.is_floating_point() else t)
    for comp, module in models.items():
        sd = {k[len(comp) + 1:]: v for k, v in flat.items() if k.startswith(comp + ".")}
        if comp == "glyph":
            _tie_t5(sd)
        own = module.state_dict()
        for k in (k for k in missing_ok if k in own):
            if k not in sd:
                sd[k] = own[k]
            elif sd[k].shape[:-1] == own[k].shape[:-1] and sd[k].shape[-1] < own[k].shape[-1]:
                sd[k] = torch.cat([sd[k].to(own[k].dtype), own[k][..., sd[k].shape[-1]:]], -1)
        try:
            module.load_state_dict(sd, strict=True)  # copies in place: optimizer and EMA hold the same parameters
        except RuntimeError as e:
            raise ValueError(f"init={cfg.init!r}: its {comp} does not match this stage's model "
                             f"({str(e).splitlines()[1].strip()})") from None


class Pause:
    """`touch <stage dir>/STOP` pauses a running stage after its current step: it writes its checkpoint, removes the
    file and returns without its final weights; running the stage again resumes there (on any number of processes,
    which is how `train all` moves the DiT onto both cores). Under torchrun every process sees the same answer."""

    def __init__(self, stage_dir: Path, d=None) -> None:
        self.file, self.d, self.step = Path(stage_dir) / "STOP", d, None

    def __call__(self, done: int, total: int) -> bool:
        """True when the stage should stop after `done` steps (never after its last)."""
        flag = torch.tensor([float(done < total and self.file.exists())])
        if self.d is not None and self.d.on:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.step = done
        return self.step is not None

    def finish(self, log: "Log | None") -> None:
        """After the checkpoint is written: close the log, consume the file, say where the stage stopped and leave
        the process group."""
        if log is not None:
            log.close()
        if self.d is None or self.d.main:
            self.file.unlink(missing_ok=True)
            print(f"{self.file.parent.name}: paused at step {self.step} ({self.file} found); run the stage again "
                  "to resume", flush=True)
        if self.d is not None:
            from glmimage import parallel

            parallel.shutdown(self.d)

    @property
    def paused(self) -> bool:
        return self.step is not None


# ---------------------------------------------------------------------------------------------------------------
# Logs: TensorBoard, metrics.jsonl and a loss-curve PNG, all in the stage folder
# ---------------------------------------------------------------------------------------------------------------
class Log:
    """Scalars to TensorBoard (stage_dir/tb) and metrics.jsonl; `plot()` redraws stage_dir/loss.png."""

    def __init__(self, stage_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = stage_dir
        self.path = stage_dir / "metrics.jsonl"
        self.rows = []
        if self.path.is_file():  # keep the history up to the resumed step, drop what a killed run wrote after it
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] < start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=start_step)

    def scalars(self, step: int, **values: float) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(k, float(v), step)

    def curves(self) -> dict[str, tuple[list[int], list[float]]]:
        """{key: (steps, values)} for every logged key but lr; rows log different keys (a DiT step is t2i or i2i,
        options switch on mid-run), so each curve holds the rows that have its key."""
        keys = dict.fromkeys(k for r in self.rows for k in r if k not in ("step", "lr"))
        return {k: ([r["step"] for r in self.rows if k in r], [r[k] for r in self.rows if k in r]) for k in keys}

    def plot(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curves = self.curves()
        fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3), squeeze=False)
        for ax, (k, (steps, ys)) in zip(axes[0], curves.items()):
            ax.plot(steps, ys, lw=0.8, alpha=0.5)
            if len(ys) >= 20:  # running mean over ~5 % of the points
                w = max(2, len(ys) // 20)
                ax.plot(steps[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=1.5)
            ax.set_title(k)
            ax.set_xlabel("step")
            if all(y > 0 for y in ys):
                ax.set_yscale("log")
        fig.suptitle(title)
        fig.tight_layout()
        out = self.dir / "loss.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out

    def close(self) -> None:
        self.tb.close()


def save_weights(module: nn.Module, path: Path, skip: tuple[str, ...] = ()) -> None:
    """A stage's final weights: the module's state dict as safetensors (keys in `skip` left out, e.g. tied ones)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in skip},
              str(path))


def require(*paths: Path) -> None:
    """ValueError naming the stage to run first when an input of this stage is missing."""
    for p in paths:
        if not Path(p).exists():
            stage = Path(p).parent.name
            raise ValueError(f"missing {p}: run `glmimage train {stage}` (same --out) before this stage")


def write_config(stage_dir: Path, cfg: StageConfig) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))


def distributed(cfg: StageConfig):
    """Join torchrun's process group (DDP stages). Each process takes an equal slice of the global batch."""
    from glmimage import parallel

    d = parallel.init("cpu")
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {d.world} processes")
    return d


def my_rows(rows, d):
    """This process's slice of a global batch (a list or a tensor's first axis)."""
    n = len(rows) // d.world
    return rows[d.rank * n:(d.rank + 1) * n]


def set_threads(cfg: StageConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def grid_image(rows: list[list[np.ndarray]], scale: int = 2, pad: int = 2) -> Image.Image:
    """rows of HxWx3 uint8 images (same size) -> one PIL image, enlarged `scale`× (nearest)."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h * scale + pad) + pad, ncol * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            big = np.asarray(im).repeat(scale, 0).repeat(scale, 1)
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            sheet[y:y + big.shape[0], x:x + big.shape[1]] = big
    return Image.fromarray(sheet)
