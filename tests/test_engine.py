"""The engine's fast paths give the plain path's outputs: compiled decode, int8 weights, placement and offload."""
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import glmimage
from glmimage.ar import generate as argen
from glmimage.cli import main as cli
from glmimage.dit.model import fill_zero_params
from glmimage.quant import Int8Linear, quantize_int8

KW = dict(greedy=True, num_inference_steps=3, progress=False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def pipe():
    return glmimage.load("debug", device="cpu")


def random_dit(p):
    """The debug DiT is zero-initialised (adaLN gates, output layer): give it weights that make a velocity."""
    fill_zero_params(p.dit)
    return p


def ar_logits(p):
    lay = argen.layout_prompt(p.tokenizer, "a red circle 'HI'", target=(2, 2), preview=(4, 4))
    n = lay.ids.numel()
    with torch.no_grad():
        return p.ar(lay.ids[None], lay.pos[:, None], torch.ones(n, n, dtype=torch.bool).tril()[None, None])


def dit_velocity(p, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, p.cfg.dit.in_channels, 8, 8, generator=g)
    glyph, mask = p.glyph.encode(["a sign 'OPEN'", "no text"])
    with torch.no_grad():
        return p.dit(x.to(dtype), torch.tensor([500.0, 20.0]), prior_ids=torch.randint(0, 64, (2, 16), generator=g),
                     prior_drop=torch.tensor([False, True]), glyph=glyph.to(dtype), glyph_mask=mask,
                     target_size=torch.tensor([[64.0, 64.0]] * 2))


def test_int8_linear_matches_float_within_one_percent():
    torch.manual_seed(0)
    lin = nn.Linear(256, 384)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (384,)
    x = torch.randn(5, 7, 256)
    err = rel_err(q(x), lin(x))
    assert 1e-4 < err < 0.01  # it is quantized (not a copy), and close
    qb = Int8Linear.from_linear(nn.Linear(256, 384).to(torch.bfloat16))
    assert qb(x.bfloat16()).dtype == torch.bfloat16


def test_int8_pipeline_error_is_small_and_weights_shrink():
    plain = random_dit(glmimage.load("debug", device="cpu"))
    quant = random_dit(glmimage.load("debug", device="cpu")).quantize("int8")
    assert not any(isinstance(m, nn.Linear) for m in list(quant.ar.modules()) + list(quant.dit.modules()))
    assert 0 < rel_err(ar_logits(quant), ar_logits(plain)) < 0.02
    assert 0 < rel_err(dit_velocity(quant), dit_velocity(plain)) < 0.02
    out = quant("a red circle 'HI'", **KW)
    assert np.asarray(out.images[0]).std() > 1  # a real image, not a constant
    with pytest.raises(ValueError, match="int8"):
        quant.quantize("int4")


def test_int8_counts_layers():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    assert quantize_int8(m) == 2 and isinstance(m[1][1], Int8Linear)


def test_compiled_decode_equals_eager(pipe, monkeypatch):
    # the compiled int8 path below is what compile() takes off AVX2-only CPUs (test_compile_on_avx2 for those)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    eager = pipe(["a red circle", "two blue squares 'AB'"], **KW)
    fast = glmimage.load("debug", device="cpu").compile()
    out = fast(["a red circle", "two blue squares 'AB'"], **KW)
    assert fast._decode is not argen.decode_one_token  # it compiled (no fallback on this machine)
    assert torch.equal(out.prior_ids, eager.prior_ids)
    again = fast(["a green star", "a yellow sign 'XY'"], seed=3, **KW)  # second call: no recompilation needed
    assert again.prior_ids.shape == eager.prior_ids.shape
    # compile() keeps Dynamo's guards on tensors only: a new batch size, or int8 weights swapped in after compiling,
    # must still recompile (a stale float graph would read the int8 codes as weights)
    assert torch.equal(fast("a red circle", **KW).prior_ids, pipe("a red circle", **KW).prior_ids)
    fast.quantize("int8")
    lays = [argen.layout_prompt(fast.tokenizer, t, target=(2, 2), preview=(4, 4)) for t in ("a red circle", "AB")]
    first = {}
    for name, step in (("compiled", fast._decode), ("eager", argen.decode_one_token)):
        def keep(*args, name=name, step=step):  # the first decode step's logits (same inputs for both)
            logits = step(*args)
            first.setdefault(name, logits.clone())
            return logits
        argen.generate(fast.ar, lays, codebook_size=fast.cfg.vq.codebook_size, pad_id=fast.tokenizer.pad_id,
                       greedy=True, decode=keep)
    assert 0 < rel_err(first["compiled"], first["eager"]) < 0.01  # int8 read by both (the kernels differ)
    assert fast._decode is not argen.decode_one_token  # ... compiled all along, no fallback to eager


def test_compile_on_avx2(pipe, monkeypatch, caplog):
    """On an AVX2-only CPU compile() keeps the BLAS product for bf16 and does not compile an int8 AR (both measured
    faster there: README "Speed and memory"); the outputs stay the eager path's."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    lin = lambda p: {type(m).__name__ for m in p.ar.modules() if "Linear" in type(m).__name__}  # noqa: E731
    fp32 = glmimage.load("debug", device="cpu").compile()
    assert lin(fp32) == {"DecodeLinear"}
    bf16 = glmimage.load("debug", device="cpu", dtype="bfloat16").compile()
    assert lin(bf16) == {"Linear"} and bf16._decode is not argen.decode_one_token
    assert torch.equal(bf16("a red circle", **KW).prior_ids,
                       glmimage.load("debug", device="cpu", dtype="bfloat16")("a red circle", **KW).prior_ids)
    with caplog.at_level(logging.INFO, logger="glmimage"):
        q = glmimage.load("debug", device="cpu").quantize("int8").compile()
    assert q._decode is argen.decode_one_token
    assert any("not compiling the AR" in r.getMessage() for r in caplog.records)
    plain = glmimage.load("debug", device="cpu").quantize("int8")
    assert torch.equal(q("a red circle", **KW).prior_ids, plain("a red circle", **KW).prior_ids)


def test_compile_failure_falls_back_to_eager_with_one_log_line(pipe, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nlong backtrace")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    p = glmimage.load("debug", device="cpu").compile()
    with caplog.at_level(logging.WARNING, logger="glmimage"):
        out = p("a red circle", **KW)
    assert torch.equal(out.prior_ids, pipe("a red circle", **KW).prior_ids)
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "backtrace" not in lines[0]


def test_offload_and_placement_give_the_same_images(pipe):
    plain = pipe("a red circle 'HI'", **KW)
    p = glmimage.load("debug", device="cpu").place(ar_device="cpu", dit_device="cpu", offload=True)
    out = p("a red circle 'HI'", **KW)
    assert p.stage_device == {"ar": torch.device("cpu"), "dit": torch.device("cpu")}
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(plain.images[0]))
    assert all(t.device.type == "cpu" for m in p.modules().values() for t in m.state_dict().values())
    with pytest.raises(ValueError, match="valid"):
        p.place(ar_device="tpu")
    moved = []
    p._move = lambda stage, device: moved.append((stage, device.type))  # what offload brings in and out
    p("a red circle", **KW, prior_ids=out.prior_ids[0])  # the plan is given: the AR stage never moves
    assert moved == [("dit", "cpu"), ("dit", "cpu")]
    moved.clear()
    p("a red circle", **KW)
    assert moved == [("ar", "cpu")] * 2 + [("dit", "cpu")] * 2


def test_peak_memory_is_reported(pipe):
    out = pipe("a red circle", **KW)
    assert out.peak_memory["cpu"] > 50  # MiB: at least the interpreter and torch


def test_bf16_int8_runs():
    p = random_dit(glmimage.load("debug", device="cpu", dtype="bfloat16")).quantize("int8")
    v = dit_velocity(p, torch.bfloat16)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    assert np.asarray(p("a star", **KW).images[0]).std() > 1


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_says_so(monkeypatch, caplog, native):
    """An AVX2 CPU emulates bf16 matmuls (~80× slower than fp32 here): loading in bf16 there logs one line."""
    import glmimage.checkpoint as ck

    monkeypatch.setattr(ck, "native_bf16", lambda dev: native)
    with caplog.at_level(logging.WARNING, logger="glmimage"):
        glmimage.load("debug", device="cpu", dtype="bfloat16")
        glmimage.load("debug", device="cpu", dtype="float32")
    emulated = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(emulated) == (0 if native else 1)


def test_cli_engine_options(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli(["generate", "a red circle", "-o", str(out), "--quantize", "int8", "--offload", "--quiet",
                "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "peak memory: cpu" in text
    assert cli(["generate", "a red circle", "-o", str(out), "--ar-device", "tpu"]) == 2
    assert "valid" in capsys.readouterr().err


def test_vae_precision_follows_the_dtype_where_it_is_safe():
    """fp16 overflows in the VAE decoder, so it decodes in fp32 there; bf16 (fp32's range) decodes in bf16."""
    half = glmimage.load("debug", device="cpu", dtype="float16")
    bf = glmimage.load("debug", device="cpu", dtype="bfloat16")
    fp = glmimage.load("debug", device="cpu")
    assert half.vae.model.dtype == torch.float32 and bf.vae.model.dtype == torch.bfloat16
    z = torch.randn(1, fp.cfg.dit.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    assert rel_err(bf.vae.decode(z), fp.vae.decode(z)) < 0.04  # random tiny VAE: 2.2 %; the trained world VAE: 0.5 %


def test_bench_runs_both_engines_on_the_same_weights(tmp_path, capsys):
    """`glmimage bench` end to end on the debug size: one worker per variant, ratios and roofline fractions."""
    import json

    assert cli(["bench", "debug", "--size", "64x64", "--steps", "1", "--variants", "ref:float32,ours:float32",
                "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| ref:float32 |" in text and "| ours:float32 |" in text
    report = json.loads((tmp_path / "bench.json").read_text())
    ref, ours = report["rows"]
    assert ours["tokens"] == 16 * 16 + 2 * 2  # preview 16×16 (the reference's) + target 2×2
    assert ref["tokens"] == ours["tokens"] + 1  # the reference also writes its end-of-image token
    for r in (ref, ours):
        assert r["ar_s"] > 0 and r["dit_s"] > 0 and r["vae_s"] > 0 and r["peak_mib"] > 0
        assert 0 < r["ar_fraction_of_limit"] < 1.5 and 0 < r["dit_fraction_of_limit"] < 1.5
    assert ours["vs_ref_same_dtype"]["total"] == pytest.approx(ref["total_s"] / ours["total_s"])
    assert report["model"]["dit_flops_per_step"] > 0 and report["machine"]["copy_bandwidth_gbs"] > 0


@pytest.mark.parametrize("argv,match", [
    (["bench", "debug", "--variants", "ours:float64"], "bad variant"),
    (["bench", "debug", "--variants", "ref:float32+int8"], "no int8"),
    (["bench", "glm-image", "--device", "cpu"], "needs a GPU"),
    (["bench", "debug", "--steps", "0"], "steps"),
])
def test_bench_bad_arguments(argv, match, capsys):
    assert cli(argv) == 2
    assert match in capsys.readouterr().err


def test_per_prompt_seeds_give_each_row_its_solo_image(pipe):
    """A server batches requests: with one seed per prompt, each row is the image that prompt gives alone."""
    prompts = ["a red circle 'HI'", "two blue squares"]
    batch = pipe(prompts, seed=[5, 9], num_inference_steps=2, progress=False)  # sampled AR, not greedy
    for i, (p, s) in enumerate(zip(prompts, [5, 9])):
        one = pipe(p, seed=[s], num_inference_steps=2, progress=False)
        assert torch.equal(one.prior_ids[0], batch.prior_ids[i])
        assert np.abs(np.asarray(one.images[0]).astype(int) - np.asarray(batch.images[i]).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="seeds"):
        pipe(prompts, seed=[1], progress=False)


def test_negative_prompt_changes_the_unconditional_branch():
    p = random_dit(glmimage.load("debug", device="cpu"))
    a = p("a sign 'OPEN'", num_inference_steps=2, progress=False)
    b = p("a sign 'OPEN'", negative_prompt="'blurry'", num_inference_steps=2, progress=False)
    c = p("a sign 'OPEN'", negative_prompt="", num_inference_steps=2, progress=False)
    assert torch.equal(a.prior_ids, b.prior_ids)  # the AR does not read it
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_loading_holds_one_copy_of_the_weights(tmp_path, monkeypatch):
    """build() hands each checkpoint tensor to its module and keeps no other reference, so the channels-last VAE
    conversion frees the tensor it replaces at once (it used to hold both: +300 MiB of peak at `small` fp32)."""
    import gc
    import weakref

    from glmimage import checkpoint
    from glmimage.vae import VAE

    glmimage.save(glmimage.load("debug", device="cpu"), tmp_path / "m")
    seen = []
    read = checkpoint.read_safetensors

    def spy(*args, **kwargs):
        out = read(*args, **kwargs)
        seen.extend(weakref.ref(t) for k, t in out.items() if k.startswith("vae.") and t.dim() == 4)
        return out

    alive = []
    to = VAE.to

    def convert(self, *args, **kwargs):  # right after the channels-last conversion, inside build()
        out = to(self, *args, **kwargs)
        if kwargs.get("memory_format") is torch.channels_last:
            gc.collect()
            alive.append(sum(r() is not None for r in seen))
        return out

    monkeypatch.setattr(checkpoint, "read_safetensors", spy)
    monkeypatch.setattr(VAE, "to", convert)
    p = glmimage.load(tmp_path / "m", device="cpu")
    assert seen and p.vae.model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert alive == [0], f"{alive} of {len(seen)} read VAE kernels still held beside their channels-last copies"


def test_gemv_probe_measures_every_kernel():
    """bench/gemv_probe.py runs end to end on a tiny working set and reports a positive rate for each kernel."""
    script = Path(__file__).parents[1] / "bench" / "gemv_probe.py"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "--dim", "256", "--mib", "1", "--reps", "2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rates = [float(m) for m in re.findall(r"\s(\d+\.\d)$", out, re.M)]
    assert len(rates) == 11 and all(r > 0 for r in rates), out
    for kernel in ("torch.bfloat16 torch.mv", "float32 compiled multiply-reduce", "_weight_int8pack_mm"):
        assert kernel in out
