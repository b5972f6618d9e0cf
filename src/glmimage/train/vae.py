"""Stage `vae`: train the AutoencoderKL on world renders, fix the latent mean/std, write latents for the DiT.

Fully convolutional, so it trains on random crops (4× cheaper at 32 px) and is judged on whole images. A second leg
(`decoder_steps`) then trains the decoder alone on whole images: the encoder, and so every latent, is the first
leg's, and the decoder learns to draw those latents sharper (the embedded model's edits 0.77 -> 0.84). The legs can
run as two jobs (`--set decoder_steps=0`, then the same stage with the leg: it resumes at the first leg's end and
keeps its latents), which is how `train all` lets the DiT start on the latents while the decoder leg runs later.
Outputs in <out>/vae/: vae.safetensors + vae.json (config with latents_mean/std), latents_*.npy (float16,
normalised), samples.png (originals over reconstructions), loss.png, tb/, ckpt/.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from glmimage.checkpoint import atomic_file, model_folder
from glmimage.config import preset
from glmimage.train import common as C
from glmimage.train.data import Dataset, to_float
from glmimage.vae import VAE


@dataclass(frozen=True, kw_only=True)
class VAETrainConfig(C.StageConfig):
    preset: str = "world"
    crop: int = 32  # training crop side (multiple of the VAE factor)
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    n_stats: int = 2000  # images used to measure the latent mean / std
    # train the decoder alone (from `init`): the encoder, and with it every latent, the normalisation and what the DiT
    # learned to paint, stay as they are, while the decoder learns to draw those latents sharper
    decoder_only: bool = False
    # a second leg after `steps` (none when steps is 0 or with decoder_only), the same in one run: the decoder alone,
    # on larger crops, with a fresh optimizer state and schedule (latents and normalisation: the first leg's encoder's)
    decoder_steps: int = 0
    decoder_crop: int = 64
    decoder_batch_size: int = 32
    decoder_lr: float = 5e-4
    # > 0: latents for the first N edit pairs only, the pairs the DiT's image-to-image rows draw from; the AR and the
    # ViT read every pair (their edit rows need ids, not latents), so the data can hold more pairs than the DiT encodes
    edit_latents: int = 0

    @property
    def total_steps(self) -> int:
        """steps, then the decoder leg: it follows a first leg that trains the whole VAE, so none after `--steps 0`
        (which only writes the latents of its init) nor with decoder_only (whose steps are all the decoder's)."""
        return self.steps + (self.decoder_steps if self.steps and not self.decoder_only else 0)


def freeze_all_but_decoder(model) -> None:
    """Only the decoder (and its post-quant conv) trains: what encodes, and so every latent, stays to the bit."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    for name, m in model.named_children():
        m.train(name in ("decoder", "post_quant_conv"))


def stage_dir(cfg) -> Path:
    return Path(cfg.out) / "vae"


def _rows(path: Path) -> int | None:
    """Rows of a saved latent array, None when there is none."""
    return len(np.load(path, mmap_mode="r")) if path.is_file() else None


def load_trained(out: str | Path) -> VAE:
    """The VAE a finished stage wrote (normalisation included)."""
    d = Path(out) / "vae"
    vae = VAE(json.loads((d / "vae.json").read_text()))
    vae.model.load_state_dict(load_file(str(d / "vae.safetensors")), strict=True)
    return vae.eval()


@torch.no_grad()
def encode_all(vae: VAE, images: np.ndarray, batch: int = 256, desc: str = "encode",
               bf16: bool | None = None) -> np.ndarray:
    """uint8 images -> normalised latents (N, C, h, w) float16. In bf16 autocast where the stages train in it (1.7×
    faster on an AVX512-BF16 CPU; mean error 0.004 of the latents' unit std against fp32, far below the DiT's)."""
    out = []
    with C.autocast(bf16):
        for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
            out.append(vae.encode(to_float(images[i:i + batch])).to(torch.float16).numpy())
    return np.concatenate(out)


def main(cfg: VAETrainConfig) -> Path:
    C.set_threads(cfg)
    out = stage_dir(cfg)
    C.write_config(out, cfg)
    mcfg = preset(cfg.preset)
    data = Dataset(Path(cfg.out) / "data" / "scenes")
    images = data["images"]
    n, size = len(data), images.shape[1]
    f = mcfg.vae_factor
    if cfg.decoder_steps < 0 or cfg.edit_latents < 0:
        raise ValueError(f"decoder_steps and edit_latents must be >= 0, got {cfg.decoder_steps} and "
                         f"{cfg.edit_latents}")
    edits_dir = Path(cfg.out) / "data" / "edits"
    edits = Dataset(edits_dir) if (edits_dir / "meta.json").is_file() else None
    n_pairs = len(edits) if edits is not None else 0
    if cfg.edit_latents > n_pairs:  # checked before training, not after it
        raise ValueError(f"edit_latents={cfg.edit_latents} but {edits_dir} holds {n_pairs} edit pairs")
    total = cfg.total_steps
    for name, crop in (("crop", cfg.crop),) + ((("decoder_crop", cfg.decoder_crop),) if total > cfg.steps else ()):
        if crop % f or crop > size:
            raise ValueError(f"{name} must be a multiple of the VAE factor {f} and at most {size}, got {crop}")
    second = replace(cfg, lr=cfg.decoder_lr)  # the decoder leg's schedule: warmup, then cosine over its steps

    def plan(step: int) -> tuple[int, int, float]:
        """(crop, batch size, learning rate) of a step."""
        if step < cfg.steps:
            return cfg.crop, cfg.batch_size, C.lr_at(step, cfg)
        return cfg.decoder_crop, cfg.decoder_batch_size, C.lr_at(step - cfg.steps, second, cfg.decoder_steps)

    torch.manual_seed(cfg.seed)
    vae = VAE({**mcfg.vae})
    C.init_from(cfg, out, {"vae": vae.model})
    model = vae.model.train()
    if cfg.decoder_only:
        if not cfg.init:
            raise ValueError("decoder_only trains the decoder of a trained VAE: give it one with --set init=MODEL")
        freeze_all_but_decoder(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = C.make_optimizer(trained, cfg)
    state = C.load_checkpoint(out, {"vae": model}, opt)
    start = state["step"] if state else 0
    if start > cfg.steps:  # resumed inside the decoder leg
        freeze_all_but_decoder(model)
    log = C.Log(out, start)
    fixed = to_float(images[:8])
    bar = tqdm(total=total, initial=start, desc="vae", unit="step")
    pause = C.Pause(out)
    for step in range(start, total):
        if step == cfg.steps:  # the decoder leg begins: the encoder frozen, a fresh optimizer
            freeze_all_but_decoder(model)
            opt.state.clear()
        crop, batch, lr = plan(step)
        g = C.step_generator(cfg.seed, step)
        idx = torch.randint(0, n, (batch,), generator=g).numpy()
        x = to_float(images[np.sort(idx)])
        oy, ox = torch.randint(0, size - crop + 1, (2,), generator=g).tolist()
        x = x[:, :, oy:oy + crop, ox:ox + crop]
        for group in opt.param_groups:
            group["lr"] = lr
        with C.forward(cfg.bf16):
            post = model.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(post.mean.dtype)
            rec = model.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        kl = post.kl().float().mean() / x[0].numel()
        loss = l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == total - 1:
            bar.set_postfix(l1=f"{l1.item():.4f}")
            log.scalars(step, loss=loss.item(), l1=l1.item(), l2=l2.item(), kl=kl.item(), grad_norm=gn.item(),
                        lr=lr)
        done = step + 1
        if done % cfg.sample_every == 0 or done in (cfg.steps, total):
            model.eval()
            with torch.no_grad():
                rec = model.decode(model.encode(fixed).latent_dist.mode()).sample
            if cfg.decoder_only or done > cfg.steps:
                freeze_all_but_decoder(model)
            else:
                model.train()
            psnr = -10 * torch.log10(((rec.clamp(-1, 1) - fixed) / 2).pow(2).mean()).item()
            log.scalars(step, val_psnr=psnr)
            as_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            C.grid_image([list(as_u8(fixed)), list(as_u8(rec))], scale=3).save(out / "samples.png")
            log.plot(f"vae · step {done}")
        if done % cfg.ckpt_every == 0 or done in (cfg.steps, total) or pause(done, total):
            C.save_checkpoint(out, {"vae": model}, opt, done)
        if pause.paused:
            break
    bar.close()
    if pause.paused:
        pause.finish(log)
        return out
    log.plot(f"vae · step {total}")
    log.close()

    # Latent statistics -> the normalisation GLM-Image applies ((z - mean) / std), then the final files. A run that
    # began where the first leg ended (`train all` runs the decoder leg as its own job, beside a DiT already training
    # on the first leg's output) has not touched the encoder: its normalisation and latents are kept, not rewritten.
    model.eval()
    k = (cfg.edit_latents or n_pairs) if n_pairs else 0
    rows = {"scenes": n, **({"source": k, "target": k} if k else {})}
    encoder_kept = 0 < cfg.steps <= start and not cfg.decoder_only and (out / "vae.json").is_file()
    if cfg.decoder_only:  # the encoder is the init's: so is the normalisation its DiT was trained on, to the bit
        init_vae = json.loads((model_folder(cfg.init) / "config.json").read_text())["vae"]
        mean, std = init_vae["latents_mean"], init_vae["latents_std"]
    elif encoder_kept:
        kept = json.loads((out / "vae.json").read_text())
        mean, std = kept["latents_mean"], kept["latents_std"]
    else:
        with torch.no_grad():
            zs = torch.cat([model.encode(to_float(images[i:i + 250])).latent_dist.mode()
                            for i in range(0, min(n, cfg.n_stats), 250)])
        mean = zs.mean(dim=(0, 2, 3)).tolist()
        std = zs.std(dim=(0, 2, 3)).tolist()
    config = {**mcfg.vae, "latents_mean": mean, "latents_std": std}
    with atomic_file(out / "vae.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    with atomic_file(out / "vae.safetensors") as tmp:
        C.save_weights(model, tmp)

    # Stage output for the DiT: normalised latents of every training image and both sides of the edit pairs (the first
    # edit_latents, or all); each file swapped in whole, so a DiT reading the old one keeps reading it
    if encoder_kept and all(_rows(out / f"latents_{side}.npy") == r for side, r in rows.items()):
        return out
    vae = load_trained(cfg.out)
    for side, r in rows.items():
        z = encode_all(vae, (images if side == "scenes" else edits[side])[:r], desc=f"latents {side}", bf16=cfg.bf16)
        with atomic_file(out / f"latents_{side}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, z)
    return out
