"""Prompt layout, sampling and the prefill / decode loop of the AR generator (gpt-fast style).

Text-to-image prompt:  `{prompt}<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>`, then the model writes
the preview grid (ph×pw ids, a layout plan that is discarded) and the target grid (th×tw ids).
Image-to-image prompt: `(<|dit_token_16384|>{cond ids}<|dit_token_16385|>)* {prompt}<sop>{th} {tw}<eop>
<|dit_token_16384|>`, then the target grid only. Condition-image ids sit at 2D mRoPE positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glmimage.ar.model import ARModel
from glmimage.tokenizer.text import GRID_BOS, GRID_EOS, IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START, TextTokenizer


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One laid-out AR prompt: ids (T,), prefill positions (3, T), decode positions (3, N) for the N grid tokens,
    and the grids written in order [(h, w), ...] (preview first for text-to-image)."""
    ids: torch.Tensor
    pos: torch.Tensor
    decode_pos: torch.Tensor
    grids: tuple[tuple[int, int], ...]

    @property
    def num_new(self) -> int:
        return sum(h * w for h, w in self.grids)


def grid_positions(base: int, h: int, w: int) -> torch.Tensor:
    """(t, h, w) mRoPE positions of an h×w grid starting at `base` -> (3, h*w) in raster order."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.full((h * w,), base), base + rows, base + cols])


def layout_prompt(tok: TextTokenizer, prompt: str, *, target: tuple[int, int], preview: tuple[int, int] | None,
                  cond: list[tuple[torch.Tensor, int, int]] = ()) -> Prompt:
    """Build ids and positions. target/preview: token grids (h, w); cond: [(ids (h*w,), h, w)] condition images."""
    th, tw = target
    text = "".join(f"{IMAGE_START}{IMAGE_PLACEHOLDER}{IMAGE_END}" for _ in cond) + prompt
    text += f"{GRID_BOS}{th} {tw}{GRID_EOS}"
    if preview is not None:
        text += f"{GRID_BOS}{preview[0]} {preview[1]}{GRID_EOS}"
    text += IMAGE_START
    raw = tok.encode(text)
    ids, pos, cur = [], [], 0
    images = iter(cond)
    for i in raw:
        if i == tok.image_placeholder_id:
            img_ids, h, w = next(images)
            ids.append(img_ids.long().cpu())
            pos.append(grid_positions(cur, h, w))
            cur += max(h, w)  # a 2D block advances the running position by its longer side
        else:
            ids.append(torch.tensor([i]))
            pos.append(torch.full((3, 1), cur))
            cur += 1
    grids = ((preview,) if preview is not None else ()) + (target,)
    dpos, base = [], cur
    for h, w in grids:
        dpos.append(grid_positions(base, h, w))
        base += max(h, w)
    return Prompt(ids=torch.cat(ids), pos=torch.cat(pos, dim=1), decode_pos=torch.cat(dpos, dim=1),
                  grids=tuple((int(h), int(w)) for h, w in grids))


NUCLEUS_CANDIDATES = 256


def _nucleus_candidates(logits: torch.Tensor, top_p: float, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits sorted descending with their ids, enough of them to hold every row's top-p nucleus.

    On the CPU the nucleus almost always lies in the few hundred most likely ids, and sorting the whole vocabulary
    (16,384 at GLM-Image's size) took a tenth of a decode step: the top NUCLEUS_CANDIDATES are taken instead
    whenever they hold top_p of every row's mass, which makes the tokens kept, and so the distribution, exactly
    those of the full sort; otherwise the full sort. (On an accelerator the check would stall the device for the
    host, and its sort is cheap: always the full sort.)"""
    k = NUCLEUS_CANDIDATES
    if logits.device.type == "cpu" and k < logits.shape[-1]:
        top, ids = torch.topk(logits, k, dim=-1)  # sorted descending
        mass = (top - lse).exp().sum(dim=-1)  # lse: logsumexp of each row
        if bool((mass > top_p).all()):
            return top, ids
    return torch.sort(logits, dim=-1, descending=True)


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           greedy: bool = False, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """logits (B, V) -> ids (B,). Temperature, then top-k, then top-p (the transformers order); no host sync on an
    accelerator.
    generator: one for the batch, or one per row (a row then draws what it would draw alone).

    With top-k the nucleus is cut from the k sorted survivors (what torch.topk returns), not from a sort of the
    whole vocabulary: the same distribution at a fraction of the cost per token."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    ids = None
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted descending
    if top_p is not None and top_p < 1.0:
        if ids is None:  # the nucleus of the whole vocabulary: probabilities over all of it
            lse = logits.logsumexp(dim=-1, keepdim=True)
            logits, ids = _nucleus_candidates(logits, top_p, lse)
            probs = (logits - lse).exp()
        else:  # after top-k: over the k survivors (the transformers order)
            probs = logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        remove = (cum - probs) >= top_p  # the mass before a token already reaches top_p
        remove[..., 0] = False  # always keep the most likely token
        logits = logits.masked_fill(remove, float("-inf"))
    choice = _draw(logits.softmax(dim=-1), generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of probs (B, W) -> (B, 1), by the inverse CDF of one uniform number per row: a row takes
    one number from its generator whatever W is (torch.multinomial draws W of them), so a row draws the same
    whether the nucleus came from the candidates or the full sort, and alone or in any batch."""
    if isinstance(generator, list):  # one generator per row: each row draws what it would draw alone
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    u = (u[:, None] * cdf[:, -1:]).to(cdf.dtype)  # of the row's total, which rounding keeps from being exactly 1
    idx = torch.searchsorted(cdf, u, right=True)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)  # last id it may pick
    return torch.minimum(idx, last)


def _batch(prompts: list[Prompt], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts -> ids (B, T), pos (3, B, T), valid (B, T) bool, decode_pos (3, B, N)."""
    t = max(p.ids.numel() for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    pos = torch.zeros(3, len(prompts), t, dtype=torch.long)
    valid = torch.zeros(len(prompts), t, dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = p.ids.numel()
        ids[b, t - n:], pos[:, b, t - n:], valid[b, t - n:] = p.ids, p.pos, True
    dpos = torch.stack([p.decode_pos for p in prompts], dim=1)
    return ids.to(device), pos.to(device), valid.to(device), dpos.to(device)


@torch.no_grad()
def prefill(model: ARModel, ids: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Run the prompt through the cache. ids (B, T), key_valid (B, S) -> logits of the last position (B, V)."""
    t, s = ids.shape[1], key_valid.shape[1]
    slots = torch.arange(s, device=ids.device)
    causal = slots[None, :] <= torch.arange(t, device=ids.device)[:, None]  # (T, S)
    mask = causal[None] & key_valid[:, None, :]
    mask |= slots[None, None, :] == torch.arange(t, device=ids.device)[None, :, None]  # pads see themselves: no NaN
    return model(ids, pos, mask[:, None], torch.arange(t, device=ids.device))[:, -1]


@torch.no_grad()
def decode_one_token(model: ARModel, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """tok (B,), pos (3, B, 1), mask (B, 1, 1, S), input_pos (1,) -> logits (B, V)."""
    return model(tok[:, None], pos, mask, input_pos)[:, -1]


@torch.no_grad()
def generate(model: ARModel, prompts: list[Prompt], *, codebook_size: int, pad_id: int, temperature: float = 0.9,
             top_p: float | None = 0.75, top_k: int | None = None, greedy: bool = False,
             generator: torch.Generator | list[torch.Generator] | None = None, progress=None,
             decode=decode_one_token, guidance: float = 1.0, uncond: list[Prompt] | None = None) -> torch.Tensor:
    """Write every grid of every prompt -> ids (B, N), N = sum of grid sizes (all prompts share one layout).

    Prompts of different lengths are left-padded into one batch. The decode loop keeps every tensor on the
    device (positions, masks and sampling included): nothing waits for the host between tokens. `decode` is
    `decode_one_token` or a compiled version of it (static shapes: one compilation per batch size and length).

    guidance > 1 with `uncond` (one prompt per prompt, the same layout with the caption left out): classifier-free
    guidance of the AR (LlamaGen): both run in one batch of 2B rows, and each token is sampled from
    uncond + guidance * (cond - uncond) of their logits, then fed to both rows."""
    guided = guidance != 1.0 and uncond is not None
    if guided and len(uncond) != len(prompts):
        raise ValueError(f"got {len(uncond)} unconditional prompts for {len(prompts)} prompts")
    rows = prompts + list(uncond) if guided else prompts
    if len({p.grids for p in rows}) != 1:
        raise ValueError("all prompts of a batch must request the same grids (same size and mode)")
    device = model.embed_tokens.weight.device
    ids, pos, valid, dpos = _batch(rows, pad_id, device)
    b, t = ids.shape
    n = prompts[0].num_new
    model.setup_caches(b, -(-(t + n) // 128) * 128)  # cache length in buckets of 128: few shapes to compile
    s = model.max_seq
    key_valid = torch.ones(b, s, dtype=torch.bool, device=device)
    key_valid[:, :t] = valid
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        # The head also scores the 128 special ids; a grid cell must be a codebook entry.
        logits = logits[:, :codebook_size]
        if guided:
            c, u = logits.float().chunk(2)
            logits = u + guidance * (c - u)
        tok = sample(logits, **kw)
        return torch.cat([tok, tok]) if guided else tok

    out = torch.empty(b, n, dtype=torch.long, device=device)
    out[:, 0] = pick(prefill(model, ids, pos, key_valid))
    slots = torch.arange(s, device=device)
    cache_pos = torch.arange(t, t + n, device=device)  # the cache slot of each decoded token
    for i in range(n - 1):
        input_pos = cache_pos[i:i + 1]
        mask = ((slots <= input_pos) & key_valid)[:, None, None, :]  # (B, 1, 1, S)
        out[:, i + 1] = pick(decode(model, out[:, i], dpos[:, :, i:i + 1], mask, input_pos))
        if progress is not None:
            progress.update(1)
    return out[:len(prompts)] if guided else out
