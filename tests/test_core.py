"""Unit tests of the engine on the debug preset: caches, batching, schedule, save/load, presets, bad input, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import glmimage
from glmimage.ar import generate as argen
from glmimage.cli import main as cli
from glmimage.config import preset
from glmimage.dit import sample as dsample


@pytest.fixture(scope="module")
def pipe():
    return glmimage.load("debug", device="cpu")


def test_cached_and_uncached_logits_are_equal(pipe):
    lay = argen.layout_prompt(pipe.tokenizer, "a red circle", target=(2, 3), preview=(3, 2))
    torch.manual_seed(0)
    ar = pipe.ar
    new = torch.randint(0, pipe.cfg.vq.codebook_size, (lay.num_new,))
    ids = torch.cat([lay.ids, new])[None]
    pos = torch.cat([lay.pos, lay.decode_pos], dim=1)[:, None]
    n = ids.shape[1]
    with torch.no_grad():
        full = ar(ids, pos, torch.ones(n, n, dtype=torch.bool).tril()[None, None])
        ar.setup_caches(1, n)
        t = lay.ids.numel()
        slots = torch.arange(n)
        steps = [argen.prefill(ar, ids[:, :t], pos[:, :, :t], torch.ones(1, n, dtype=torch.bool))]
        for i in range(t, n):
            mask = (slots <= i)[None, None, None]
            steps.append(argen.decode_one_token(ar, ids[:, i], pos[:, :, i:i + 1], mask, torch.tensor([i])))
    assert full.std() > 1e-3
    torch.testing.assert_close(torch.stack(steps[:-1], dim=1), full[:, t - 1:n - 1], rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_single(pipe):
    prompts = ["a red circle 'HI'", "two blue squares on a long long long background"]
    batch = pipe(prompts, greedy=True, num_inference_steps=3, progress=False)
    for i, p in enumerate(prompts):  # different prompt lengths: left padding must not leak into the result
        one = pipe(p, greedy=True, num_inference_steps=3, progress=False)
        assert torch.equal(one.prior_ids[0], batch.prior_ids[i])
    # the batch draws its noise like diffusers (one generator, sample after sample): item 0 sees the same noise
    diff = np.abs(np.asarray(one.images[0]).astype(int) - np.asarray(batch.images[1]).astype(int)).max()
    first = pipe(prompts[0], greedy=True, num_inference_steps=3, progress=False)
    assert np.abs(np.asarray(first.images[0]).astype(int) - np.asarray(batch.images[0]).astype(int)).max() <= 1
    assert diff > 1


def test_ar_guidance_samples_from_the_guided_logits(pipe):
    """Guided decoding (cond and uncond rows in one cached batch, left-padded to different lengths) writes what
    greedy decoding of uncond + g * (cond - uncond) gives when each sequence is recomputed in full, uncached."""
    tok, ar, n_codes = pipe.tokenizer, pipe.ar, pipe.cfg.vq.codebook_size
    grids = dict(target=(2, 3), preview=(3, 2))
    cond = argen.layout_prompt(tok, "a red circle to the left of a blue star", **grids)
    unc = argen.layout_prompt(tok, "", **grids)
    g = 3.0

    def last_logits(lay, new):
        ids = torch.cat([lay.ids, new])[None]
        pos = torch.cat([lay.pos, lay.decode_pos[:, :new.numel()]], dim=1)[:, None]
        n = ids.shape[1]
        return ar(ids, pos, torch.ones(n, n, dtype=torch.bool).tril()[None, None])[0, -1, :n_codes]

    ar.clear_caches()  # full, uncached forwards
    with torch.no_grad():
        new, plain = torch.empty(0, dtype=torch.long), []
        for _ in range(cond.num_new):
            c, u = last_logits(cond, new), last_logits(unc, new)
            plain.append(int(c.argmax()))
            new = torch.cat([new, (u + g * (c - u)).argmax()[None]])
    kw = dict(codebook_size=n_codes, pad_id=tok.pad_id, greedy=True)
    guided = argen.generate(ar, [cond, cond], guidance=g, uncond=[unc, unc], **kw)
    assert guided.tolist() == [new.tolist()] * 2
    assert new.tolist() != plain  # the guidance changed the plan (else the test proves nothing)
    assert torch.equal(argen.generate(ar, [cond], guidance=1.0, uncond=[unc], **kw),
                       argen.generate(ar, [cond], **kw))
    with pytest.raises(ValueError, match="unconditional"):
        argen.generate(ar, [cond], guidance=g, uncond=[unc, unc], **kw)
    out = pipe("a red circle", ar_guidance_scale=2.0, num_inference_steps=2, progress=False)
    assert out.images[0].size == (pipe.cfg.sampling.width, pipe.cfg.sampling.height)


def test_sampling_is_seeded_and_varies(pipe):
    a = pipe("a star", seed=1, num_inference_steps=2, progress=False)
    b = pipe("a star", seed=1, num_inference_steps=2, progress=False)
    c = pipe("a star", seed=2, num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert argen.sample(logits, greedy=True).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {argen.sample(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    draws = {argen.sample(logits, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {3}  # p(3) = 0.64 > 0.5 alone


@pytest.mark.parametrize("top_k,top_p", [(20, 0.6), (None, 0.6), (20, None), (7, 0.95)])
def test_sample_matches_the_transformers_filters(top_k, top_p):
    """The sampler (nucleus cut from the top-k survivors) draws from the distribution of transformers' warpers
    (temperature, TopKLogitsWarper, TopPLogitsWarper over the whole vocabulary)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)) * 2
    warped = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    draws = argen.sample(logits.expand(20000, -1), temperature=0.8, top_k=top_k, top_p=top_p, generator=g)
    freq = torch.bincount(draws, minlength=100).float() / draws.numel()
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    assert (freq - expected).abs().max() < 0.015


def test_condition_kv_rows_and_glyph_padding_are_masked(pipe):
    """Rows that skip the condition cache equal a call without it; masked glyph padding equals no padding."""
    dit = pipe.dit
    torch.manual_seed(0)
    cb, c, gd = pipe.cfg.dit.codebook_size, pipe.cfg.dit.in_channels, pipe.cfg.dit.glyph_dim
    with torch.no_grad():
        for p in dit.parameters():  # the training init zeroes gates; make every path count
            p.add_(torch.randn_like(p) * 0.05)
        x, ids, t = torch.randn(1, c, 4, 4), torch.randint(0, cb, (1, 4)), torch.tensor([300.0])
        size, g = torch.tensor([[32.0, 32.0]]), torch.randn(1, 3, gd)
        kv = dit.condition_kv([torch.randn(1, c, 4, 4)], [torch.randint(0, cb, (1, 4))], [(32, 32)])
        kw = dict(prior_ids=ids, prior_drop=torch.tensor([False]), target_size=size)
        plain = dit(x, t, glyph=g, **kw)
        with_kv = dit(x, t, glyph=g, cond_kv=kv, **kw)
        kw2 = dict(prior_ids=ids.repeat(2, 1), prior_drop=torch.tensor([False, False]), target_size=size.repeat(2, 1))
        both = dit(x.repeat(2, 1, 1, 1), t.repeat(2), glyph=g.repeat(2, 1, 1), cond_kv=kv,
                   use_cond=torch.tensor([True, False]), **kw2)
        padded = torch.cat([g, torch.randn(1, 2, gd)], dim=1)
        masked = dit(x, t, glyph=padded, glyph_mask=torch.tensor([[True] * 3 + [False] * 2]), **kw)
    torch.testing.assert_close(both[0], with_kv[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    assert (with_kv - plain).abs().max() > 1e-4


def test_schedule_endpoints():
    ts = dsample.timesteps(50)
    assert ts[0] == 1000 and ts[-1] == 20 and len(ts) == 50
    mu = dsample.shift_mu(4096)
    assert mu == pytest.approx(3.25)
    s = dsample.shifted_sigmas(ts, mu)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    assert s[1] == pytest.approx(0.9938, abs=1e-4)  # published 1024² schedule: 1.0, 0.9938, 0.9873, ...
    with pytest.raises(ValueError):
        dsample.timesteps(0)


def test_official_parameter_counts():
    """The glm-image preset on the meta device has the official sizes (AR side 10.11 B, DiT 6.93 B)."""
    from glmimage.ar.model import ARModel
    from glmimage.dit.model import DiT
    from glmimage.tokenizer.vq import VisualTokenizer

    cfg = preset("glm-image")
    with torch.device("meta"):
        ar, vq, dit = ARModel(cfg.ar), VisualTokenizer(cfg.vq), DiT(cfg.dit)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    post_quant_conv = cfg.vq.code_dim * cfg.vq.dim + cfg.vq.dim  # in the official file, never used; we drop it
    assert count(ar) + count(vq) + post_quant_conv == 10_114_245_632
    assert count(dit) == 6_926_882_880
    assert round((count(ar) + count(vq)) / 1e9, 2) == 10.11


def test_save_load_round_trip(pipe, tmp_path):
    glmimage.save(pipe, tmp_path / "m")
    again = glmimage.load(tmp_path / "m", device="cpu")
    a = pipe("a 'HI' sign", seed=3, num_inference_steps=3, progress=False)
    b = again("a 'HI' sign", seed=3, num_inference_steps=3, progress=False)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert again.cfg == pipe.cfg
    glmimage.save(again, tmp_path / "m")  # overwrite in place keeps a loadable folder
    assert glmimage.load(tmp_path / "m", device="cpu").cfg == pipe.cfg


def test_embedding_tables_are_memory_mapped_copy_on_write(pipe, tmp_path):
    """Embedding tables stored in their dtype are views of a private map of the file (only the rows a prompt reads
    become resident); writing to them never reaches the file; a cast table (bf16 from fp32) is read instead."""
    glmimage.save(pipe, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    before = f.read_bytes()
    a = glmimage.load(tmp_path / "m", device="cpu")
    for w in (a.ar.embed_tokens.weight, a.dit.prior_embedding.weight):
        assert w.untyped_storage().nbytes() == f.stat().st_size  # a view of the whole file's map
    assert a.ar.lm_head.weight.untyped_storage().nbytes() == a.ar.lm_head.weight.nbytes  # the rest: read
    assert torch.equal(a.ar.embed_tokens.weight, pipe.ar.embed_tokens.weight)
    with torch.no_grad():
        a.ar.embed_tokens.weight[0] += 1.0
        a.dit.prior_embedding.weight.zero_()
    assert f.read_bytes() == before
    b = glmimage.load(tmp_path / "m", device="cpu")
    assert torch.equal(b.dit.prior_embedding.weight, pipe.dit.prior_embedding.weight)
    half = glmimage.load(tmp_path / "m", device="cpu", dtype="bfloat16")
    w = half.ar.embed_tokens.weight
    assert w.dtype == torch.bfloat16 and w.untyped_storage().nbytes() == w.nbytes
    glmimage.save(b, tmp_path / "m")  # saving over the mapped file writes a new one: the maps stay valid
    assert torch.equal(b.ar.embed_tokens.weight, pipe.ar.embed_tokens.weight)
    assert torch.equal(glmimage.load(tmp_path / "m", device="cpu").ar.embed_tokens.weight, pipe.ar.embed_tokens.weight)


def test_image_readers_are_read_only_when_an_image_needs_them(pipe, tmp_path, ref_dir):
    """Loaded folders defer the ViT and the VAE encoder: text-to-image never reads them; an edit reads them once,
    with the saved weights, on their stage's device (or parked in CPU memory when offloading), and the edit equals
    the one of a pipeline built with every weight."""
    glmimage.save(pipe, tmp_path / "m")
    src = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    for folder in (tmp_path / "m", ref_dir[0]):
        lazy = glmimage.load(folder, device="cpu")
        assert lazy._vq is None and "vq" not in lazy.modules()
        assert lazy.vae.encoder_deferred and not any(n.startswith("model.encoder.")
                                                     for n, _ in lazy.vae.named_parameters())
        lazy("a 'HI' sign", num_inference_steps=2, progress=False)
        assert lazy._vq is None and lazy.vae.encoder_deferred  # text-to-image read neither
        lazy("make it red", images=[src], num_inference_steps=2, progress=False)
        assert lazy._vq is not None and "vq" in lazy.modules() and not lazy.vae.encoder_deferred
        ref = glmimage.load(folder, device="cpu")
        eager = ref.vq_factory()
        for k, v in eager.state_dict().items():
            assert torch.equal(v, lazy.vq.state_dict()[k]), k
        enc = lazy.vae.model.encoder
        assert enc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        ref.vae.materialize()
        for k, v in ref.vae.model.encoder.state_dict().items():
            assert torch.equal(v, enc.state_dict()[k]), k
    with pytest.raises(RuntimeError, match="VAE.encode"):
        glmimage.load(tmp_path / "m", device="cpu").vae.model.encode(torch.zeros(1, 3, 64, 64))
    full = pipe("make it red", images=[src], num_inference_steps=2, progress=False)
    again = glmimage.load(tmp_path / "m", device="cpu")
    edit = again("make it red", images=[src], num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(edit.images[0]), np.asarray(full.images[0]))
    again = glmimage.load(tmp_path / "m", device="cpu")
    for k, v in pipe.vq.state_dict().items():  # saving a lazy pipeline writes the ViT it never used
        assert torch.equal(v, again.vq.state_dict()[k])
    glmimage.save(glmimage.load(tmp_path / "m", device="cpu"), tmp_path / "m2")
    m2 = glmimage.load(tmp_path / "m2", device="cpu")
    assert torch.equal(m2.vq.codebook.weight, pipe.vq.codebook.weight)
    m2.vae.materialize()  # ... and the VAE encoder
    for k, v in pipe.vae.model.encoder.state_dict().items():
        assert torch.equal(v, m2.vae.model.encoder.state_dict()[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_are_cast_as_they_are_read(pipe, tmp_path, ref_dir, dtype):
    """Loading in a half dtype casts each tensor when it is read (no fp32 copy of the model in memory) and gives
    exactly the fp32 weights converted; the glyph encoder stays fp32, the VAE follows component_dtype."""
    from glmimage.checkpoint import component_dtype

    glmimage.save(pipe, tmp_path / "m")
    dt = getattr(torch, dtype)
    for folder in (tmp_path / "m", ref_dir[0]):
        half, full = glmimage.load(folder, device="cpu", dtype=dtype), glmimage.load(folder, device="cpu")
        for name in ("ar", "vq", "dit", "glyph", "vae"):
            a, b = half.modules().get(name) or getattr(half, name), getattr(full, name)
            want = component_dtype(name, dt)
            for k, v in b.state_dict().items():
                got = a.state_dict()[k]
                assert got.dtype == (want if v.is_floating_point() else v.dtype), (name, k)
                assert torch.equal(got, v.to(got.dtype)), (name, k)


def test_timings_and_shapes(pipe):
    r = pipe(["a", "b"], height=96, width=64, num_inference_steps=2, progress=False)
    assert [im.size for im in r.images] == [(64, 96)] * 2
    assert set(r.timings) == {"ar", "dit", "vae", "total"} and all(v >= 0 for v in r.timings.values())
    assert r.prior_ids.shape == (2, 3, 2)


def test_given_prior_ids_are_painted_without_the_ar(pipe, monkeypatch):
    """prior_ids (the reference's prior_token_ids): the AR is skipped, the DiT paints exactly that plan, which is
    what the AR's own plan gives when passed back; a (th, tw) plan serves every prompt."""
    r = pipe(["a red circle", "two blue squares"], num_inference_steps=2, seed=[1, 2], progress=False)
    monkeypatch.setattr(argen, "generate", lambda *a, **k: pytest.fail("the AR ran although prior_ids were given"))
    again = pipe(["a red circle", "two blue squares"], num_inference_steps=2, seed=[1, 2], prior_ids=r.prior_ids,
                 progress=False)
    assert torch.equal(again.prior_ids, r.prior_ids)
    for x, y in zip(r.images, again.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    one = pipe(["a", "b"], num_inference_steps=2, prior_ids=r.prior_ids[1], progress=False)
    assert torch.equal(one.prior_ids, r.prior_ids[1].expand(2, -1, -1))
    other = pipe("a red circle", num_inference_steps=2, seed=1, prior_ids=(r.prior_ids[0] + 1) % 16, progress=False)
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(r.images[0]))  # the plan is what is painted


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(3, 2, 2, dtype=torch.long), r"shape \(1, 2, 2\) or \(2, 2\)"),
    (torch.zeros(2, 2), "integer ids"),
    (torch.full((2, 2), 10**6), r"lie in \[0, "),
    (torch.full((2, 2), -1), r"lie in \[0, "),
])
def test_bad_prior_ids(pipe, ids, match):
    with pytest.raises(ValueError, match=match):
        pipe("x", prior_ids=ids, num_inference_steps=1, progress=False)


def test_image_to_image_runs_with_different_sizes(pipe, tmp_path):
    a = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    b = Image.fromarray((np.random.RandomState(1).rand(100, 70, 3) * 255).astype("uint8"))  # resized to the grid
    b.save(tmp_path / "b.png")
    r = pipe("combine", images=[a, tmp_path / "b.png"], num_inference_steps=2, progress=False)
    assert r.images[0].size == (64, 64)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming what is valid
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "non-empty"),
    (dict(prompt=["ok", "  "]), "non-empty"),
    (dict(prompt="x", height=50), "multiple of the model's token stride 32"),
    (dict(prompt="x", width=0), "multiple"),
    (dict(prompt="x", height=32, width=256), "aspect ratio"),
    (dict(prompt="x", num_inference_steps=0), ">= 1"),
    (dict(prompt="x", ar_guidance_scale=-1.0), "ar_guidance_scale"),
    (dict(prompt="x", ar_guidance_scale=float("nan")), "ar_guidance_scale"),
])
def test_bad_generation_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, progress=False)


def test_unreadable_condition_image(pipe, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read condition image"):
        pipe("x", images=[tmp_path / "bad.png"], progress=False)
    with pytest.raises(ValueError, match="cannot read condition image"):
        pipe("x", images=[tmp_path / "missing.png"], progress=False)


def test_bad_checkpoints(pipe, tmp_path):
    glmimage.save(pipe, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        glmimage.load(tmp_path / "m", device="cpu")
    weights.unlink()
    with pytest.raises(ValueError, match="not found"):
        glmimage.load(tmp_path / "m", device="cpu")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "model.bin")
    with pytest.raises(ValueError, match="pickle"):
        glmimage.load(tmp_path / "m", device="cpu")
    with pytest.raises(ValueError, match="pickle"):
        glmimage.load(tmp_path / "m" / "model.bin", device="cpu")
    # a checkpoint whose config says one size and whose tensors have another
    glmimage.save(pipe, tmp_path / "n")
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())
    cfg["dit"]["n_heads"] = 8
    (tmp_path / "n" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        glmimage.load(tmp_path / "n", device="cpu")
    (tmp_path / "n" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        glmimage.load(tmp_path / "n", device="cpu")
    # a tensor missing from a component that is read only when an image needs it: refused at load, not at an edit
    for prefix, what in (("vae.encoder.", "vae encoder"), ("vq.", "vq")):
        glmimage.save(pipe, tmp_path / "o")
        f = tmp_path / "o" / "model.safetensors"
        tensors = load_file(str(f))
        del tensors[next(k for k in tensors if k.startswith(prefix))]
        save_file(tensors, str(f))
        with pytest.raises(ValueError, match=f"{what}: checkpoint does not match the model: missing"):
            glmimage.load(tmp_path / "o", device="cpu")


@pytest.mark.parametrize("name,match", [("nope", "debug, glm-image"), ("debug", None)])
def test_load_names(name, match, tmp_path):
    if match:
        with pytest.raises(ValueError, match=match):
            glmimage.load(name, device="cpu")
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda, npu, mps"):
        glmimage.load("debug", device="tpu")
    with pytest.raises(ValueError, match="valid: float32"):
        glmimage.load("debug", device="cpu", dtype="int3")


def test_bfloat16_runs(pipe):
    bf = glmimage.load("debug", device="cpu", dtype="bfloat16")
    r = bf("a red circle", num_inference_steps=2, progress=False)
    assert np.isfinite(np.asarray(r.images[0])).all() and r.images[0].size == (64, 64)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_generate_edit_convert(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert cli(["generate", "a red circle 'HI'", "-o", str(out), "--size", "96x64", "--steps", "2", "--quiet"]) == 0
    assert Image.open(out).size == (96, 64)
    assert "timings: ar" in capsys.readouterr().out
    assert cli(["edit", "--image", str(out), "--image", str(out), "make it blue", "-o", str(tmp_path / "b.png"),
                "--steps", "2", "--quiet", "--n", "2"]) == 0
    assert Image.open(tmp_path / "b_1.png").size == (64, 64)
    assert cli(["convert", "debug", str(tmp_path / "own")]) == 0
    assert cli(["generate", "x", "--model", str(tmp_path / "own"), "-o", str(tmp_path / "c.png"), "--steps", "1",
                "--quiet"]) == 0
    assert cli(["generate", "x", "--size", "50x64", "-o", str(tmp_path / "d.png")]) == 2
    assert "multiple of the model's token stride" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        cli(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--size", "--steps", "--guidance", "--seed", "--greedy", "--device", "--dtype"):
        assert flag in text


@pytest.mark.parametrize("scale", [4.0, 0.05])
def test_nucleus_from_candidates_is_the_nucleus_of_the_full_sort(scale):
    """A GLM-sized vocabulary: a peaked row's nucleus comes from the top 256 candidates (no full sort), a flat row's
    from the full sort; either way the draws follow transformers' TopPLogitsWarper, and a row draws the same alone
    as in a batch with a row that needs the other path."""
    from transformers.generation.logits_process import TopPLogitsWarper

    v = 16384
    logits = torch.randn(1, v, generator=torch.Generator().manual_seed(0)) * scale
    expected = TopPLogitsWarper(0.75)(None, logits.clone()).softmax(-1)[0]
    mass_top = logits.softmax(-1).topk(argen.NUCLEUS_CANDIDATES).values.sum().item()
    assert (mass_top > 0.75) == (scale > 1)  # the two paths
    draws = argen.sample(logits.expand(20000, -1), top_p=0.75, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=v).float() / draws.numel()
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    assert (freq - expected).abs().max() < 0.015
    other = torch.randn(1, v, generator=torch.Generator().manual_seed(2)) * (0.05 if scale > 1 else 4.0)
    alone = [argen.sample(logits, top_p=0.75, generator=[torch.Generator().manual_seed(s)]).item() for s in range(20)]
    batched = [argen.sample(torch.cat([logits, other]), top_p=0.75,
                            generator=[torch.Generator().manual_seed(s), torch.Generator().manual_seed(99)])[0].item()
               for s in range(20)]
    assert alone == batched


def test_dit_canvas_is_read_by_the_conditional_rows_only():
    """canvas_patch > 0 (the world model): the canvas (text, shapes) enters through a zero-initialised embedder (a
    trained DiT without one is unchanged by it), rows whose conditions are dropped never see it, and a one-channel
    embedder is the first columns of a two-channel one (how a text-only model grows the shape channel)."""
    from dataclasses import replace

    from glmimage.dit.model import DiT, fill_zero_params

    cfg = preset("world").dit
    assert (cfg.canvas_patch, cfg.canvas_channels) == (8, 2) and preset("glm-image").dit.canvas_patch == 0
    torch.manual_seed(0)
    dit = DiT(cfg)
    dit.initialize_weights()
    assert dit.canvas_embedder.weight.shape == (cfg.dim, 2 * 64) and not dit.canvas_embedder.weight.any()
    fill_zero_params(dit)  # the other zero-initialised layers (adaLN, output) get values, or every output is 0
    with torch.no_grad():
        dit.canvas_embedder.weight.zero_()
    b = 2
    x, t = torch.randn(b, cfg.in_channels, 16, 16), torch.tensor([500.0, 500.0])
    kw = dict(prior_ids=torch.randint(0, 100, (b, 64)), prior_drop=torch.tensor([False, True]),
              glyph=torch.randn(b, 3, cfg.glyph_dim), target_size=torch.tensor([[64.0, 64.0]] * b))
    canvas = torch.rand(b, 2, 64, 64)
    plain = dit(x, t, **kw)
    assert torch.equal(dit(x, t, **kw, canvas=canvas), plain)  # zero embedder: no effect
    with torch.no_grad():
        dit.canvas_embedder.weight.normal_(0, 0.1)
    seen = dit(x, t, **kw, canvas=canvas)
    assert (seen[0] - plain[0]).abs().max() > 1e-3  # the conditional row reads it
    torch.testing.assert_close(seen[1], plain[1])  # the dropped row does not
    other = canvas.clone()
    other[:, 1] = torch.rand(b, 64, 64)
    assert (dit(x, t, **kw, canvas=other)[0] - seen[0]).abs().max() > 1e-3  # the shape channel is read
    with pytest.raises(ValueError, match=r"canvas must be \(B, 2, 64, 64\)"):
        dit(x, t, **kw, canvas=torch.rand(b, 1, 64, 64))
    with pytest.raises(ValueError, match="canvas must be"):
        dit(x, t, **kw, canvas=torch.rand(b, 2, 32, 32))

    one = DiT(replace(cfg, canvas_channels=1))
    one.load_state_dict({**dit.state_dict(), "canvas_embedder.weight": dit.canvas_embedder.weight[:, :64]})
    with torch.no_grad():
        dit.canvas_embedder.weight[:, 64:] = 0
    torch.testing.assert_close(one(x, t, **kw, canvas=canvas[:, :1]), dit(x, t, **kw, canvas=canvas))
