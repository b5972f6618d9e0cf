"""Parity with the reference implementation (transformers + diffusers GLM-Image classes, tiny random weights)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import glmimage
from glmimage.ar import generate as argen
from glmimage.dit import sample as dsample
from glmimage.glyph import extract_glyph_texts
from glmimage.pipeline import upsample_ids
from reference import RefSize, build_reference, fix_i2i_bug, make_greedy

warnings.filterwarnings("ignore")

SIZES = {
    "base": RefSize(),
    # different head counts, GQA ratio, depth, mRoPE split, latent channels
    "wide": RefSize(ar_hidden=128, ar_layers=3, ar_heads=4, ar_kv_heads=1, mrope=(4, 2, 2), vit_hidden=32,
                    vit_layers=1, dit_layers=3, dit_heads=2, dit_head_dim=32, t5_dim=32, latent_channels=8),
}


@pytest.fixture(scope="module", params=sorted(SIZES))
def pair(request, tmp_path_factory):
    """(reference GlmImagePipeline, glmimage Pipeline loaded from the reference's saved official layout)."""
    ref = build_reference(SIZES[request.param], seed=1)
    d = tmp_path_factory.mktemp(request.param) / "official"
    ref.save_pretrained(d)
    make_greedy(ref)
    fix_i2i_bug(ref)
    return ref, glmimage.load(d, device="cpu")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


def cond_images():
    rs = np.random.RandomState(0)
    return [Image.fromarray((rs.rand(128, 128, 3) * 255).astype("uint8")) for _ in range(2)]


def ref_inputs(ref, prompt, h, w, images=None):
    content = [{"type": "image", "image": im} for im in images or []] + [{"type": "text", "text": prompt}]
    return ref.processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True, target_h=h,
                                             target_w=w, return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("h,w", [(128, 96), (64, 160)])
def test_ar_logits_text_to_image(pair, h, w):
    ref, ours = pair
    prompt = "A cat 'HI' on a red sofa"
    inputs = ref_inputs(ref, prompt, h, w)
    target, preview = ours.cfg.grids(h, w)
    lay = argen.layout_prompt(ours.tokenizer, prompt, target=target, preview=preview)
    assert torch.equal(lay.ids, inputs["input_ids"][0])
    with torch.no_grad():
        want = ref.vision_language_encoder(**inputs).logits
        t = lay.ids.numel()
        got = ours.ar(lay.ids[None], lay.pos[:, None], torch.ones(t, t, dtype=torch.bool).tril()[None, None])
    assert want.std() > 1e-3
    assert rel_err(want, got) <= 1e-4


def test_ar_logits_and_tokens_image_to_image(pair):
    ref, ours = pair
    images = cond_images()
    inputs = ref_inputs(ref, "Make it blue", 96, 64, images)
    vle = ref.vision_language_encoder
    with torch.no_grad():
        feats = vle.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"][:2]).pooler_output
        ref_ids = vle.get_image_tokens(list(feats))
        ours_ids = [ours.condition_tokens(im)[1] for im in images]
        assert torch.equal(ref_ids, torch.cat([i.flatten() for i in ours_ids]))
        want = vle(**inputs).logits
        lay = argen.layout_prompt(ours.tokenizer, "Make it blue", target=(3, 2), preview=None,
                                  cond=[(i.flatten(), *i.shape) for i in ours_ids])
        t = lay.ids.numel()
        assert t == inputs["input_ids"].shape[1]
        got = ours.ar(lay.ids[None], lay.pos[:, None], torch.ones(t, t, dtype=torch.bool).tril()[None, None])
    assert rel_err(want, got) <= 1e-4


def test_dit_velocity(pair):
    ref, ours = pair
    torch.manual_seed(0)
    c = ours.cfg.dit.in_channels
    x = torch.randn(2, c, 12, 8)
    ids = torch.randint(0, ours.cfg.dit.codebook_size, (2, 24))
    glyph = torch.randn(2, 7, ours.cfg.dit.glyph_dim)
    t = torch.tensor([999.0, 420.0])
    size = torch.tensor([[96.0, 64.0], [96.0, 64.0]])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        want = ref.transformer(hidden_states=x, encoder_hidden_states=glyph, prior_token_id=ids,
                               prior_token_drop=drop[:, None].expand(2, 24), timestep=t, target_size=size,
                               crop_coords=torch.zeros(2, 2), return_dict=False)[0]
        got = ours.dit(x, t, prior_ids=ids, prior_drop=drop, glyph=glyph, target_size=size)
    assert want.std() > 1e-3
    assert rel_err(want, got) <= 1e-4


def test_dit_condition_kv_cache(pair):
    """The reference's write/read KV cache and our condition_kv prefix give the same velocity."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    ref, ours = pair
    torch.manual_seed(1)
    c, cb = ours.cfg.dit.in_channels, ours.cfg.dit.codebook_size
    conds = [torch.randn(1, c, 8, 8), torch.randn(1, c, 4, 8)]
    cond_ids = [torch.randint(0, cb, (1, 16)), torch.randint(0, cb, (1, 8))]
    sizes = [(64, 64), (32, 64)]
    x, ids, glyph = torch.randn(1, c, 8, 8), torch.randint(0, cb, (1, 16)), torch.randn(1, 3, ours.cfg.dit.glyph_dim)
    t, size = torch.tensor([500.0]), torch.tensor([[64.0, 64.0]])
    with torch.no_grad():
        cache = GlmImageKVCache(num_layers=ref.transformer.config.num_layers)
        cache.set_mode("write")
        for lat, pid, hw in zip(conds, cond_ids, sizes):
            ref.transformer(hidden_states=lat, encoder_hidden_states=glyph[:, :0], prior_token_id=pid,
                            prior_token_drop=torch.zeros_like(pid, dtype=torch.bool), timestep=torch.zeros(1),
                            target_size=torch.tensor([hw]), crop_coords=torch.zeros(1, 2), kv_caches=cache)
        cache.next_sample()
        cache.set_mode("read")
        want = ref.transformer(hidden_states=x, encoder_hidden_states=glyph, prior_token_id=ids,
                               prior_token_drop=torch.zeros_like(ids, dtype=torch.bool), timestep=t,
                               target_size=size, crop_coords=torch.zeros(1, 2), kv_caches=cache, return_dict=False)[0]
        kv = ours.dit.condition_kv(conds, cond_ids, sizes)
        got = ours.dit(x, t, prior_ids=ids, prior_drop=torch.tensor([False]), glyph=glyph, target_size=size,
                       cond_kv=kv)
        plain = ours.dit(x, t, prior_ids=ids, prior_drop=torch.tensor([False]), glyph=glyph, target_size=size)
    assert rel_err(want, got) <= 1e-4
    assert rel_err(want, plain) > 1e-3  # the cache really changes the result


@pytest.mark.parametrize("steps,h,w", [(50, 1024, 1024), (8, 64, 96), (30, 2048, 1536)])
def test_schedule(pair, steps, h, w):
    ref, ours = pair
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift

    seq = (h // 16) * (w // 16)
    ts = dsample.timesteps(steps)
    want_ts = np.linspace(1000, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu_ref = calculate_shift(seq, 256, 0.25, 0.75)
    sched = ref.scheduler
    sched.set_timesteps(timesteps=want_ts, sigmas=want_ts / 1000, mu=mu_ref)
    mu = dsample.shift_mu(seq)
    assert mu == pytest.approx(mu_ref)
    assert np.array_equal(ts, sched.timesteps.numpy())
    assert torch.allclose(dsample.shifted_sigmas(ts, mu), sched.sigmas, atol=1e-6)


@pytest.mark.parametrize("prompt", ["no quotes at all", "a sign 'OPEN'", "“WORLD” and 'HI'",
                                    "'A' \"B\" 「C」", "two 'x' 'yz' three 'abc'"])
def test_glyph_embeddings(pair, prompt):
    ref, ours = pair
    with torch.no_grad():
        want = ref._get_glyph_embeds(prompt)[0]
        got = ours.glyph.encode_one(prompt)
    assert ref.get_glyph_texts(prompt)[0] == extract_glyph_texts(prompt)
    assert want.shape == got.shape
    assert (want - got).abs().max() <= 1e-5


def max_pixel_diff(a, b):
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


@pytest.mark.parametrize("h,w,guidance", [(64, 64, 1.5), (128, 96, 3.0), (64, 128, 1.0)])
def test_end_to_end_text_to_image(pair, h, w, guidance):
    ref, ours = pair
    prompt = "A poster that says 'HELLO' and “WORLD”"
    want = ref(prompt=prompt, height=h, width=w, num_inference_steps=4, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(7)).images[0]
    got = ours(prompt, height=h, width=w, num_inference_steps=4, guidance_scale=guidance, seed=7, greedy=True,
               progress=False).images[0]
    assert np.asarray(want).std() > 5  # a real image, not a flat one
    assert max_pixel_diff(want, got) <= 2


def test_end_to_end_image_to_image(pair):
    ref, ours = pair
    images = cond_images()
    want = ref(prompt="Blend them 'OK'", image=images, height=128, width=96, num_inference_steps=3,
               guidance_scale=2.0, generator=torch.Generator().manual_seed(5)).images[0]
    got = ours("Blend them 'OK'", images=images, height=128, width=96, num_inference_steps=3, guidance_scale=2.0,
               seed=5, greedy=True, progress=False).images[0]
    assert np.asarray(want).std() > 5
    assert max_pixel_diff(want, got) <= 2


def test_export_to_official_layout(pair, tmp_path):
    """Save in our format -> load -> export to the official layout -> GlmImagePipeline.from_pretrained: same image."""
    from diffusers import GlmImagePipeline

    _, ours = pair
    glmimage.save(ours, tmp_path / "own")
    again = glmimage.load(tmp_path / "own", device="cpu")
    glmimage.export_official(again, tmp_path / "official")
    ref = GlmImagePipeline.from_pretrained(tmp_path / "official")
    ref.set_progress_bar_config(disable=True)
    make_greedy(ref)
    want = ref(prompt="a 'X'", height=64, width=96, num_inference_steps=3,
               generator=torch.Generator().manual_seed(2)).images[0]
    got = again("a 'X'", height=64, width=96, num_inference_steps=3, seed=2, greedy=True, progress=False).images[0]
    assert max_pixel_diff(want, got) <= 2


def test_upsample_matches_reference():
    from diffusers import GlmImagePipeline

    ids = torch.randint(0, 100, (1, 3, 5))
    assert torch.equal(upsample_ids(ids), GlmImagePipeline._upsample_token_ids(ids.flatten(), 3, 5))
