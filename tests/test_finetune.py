"""Fine-tuning: data sources, LoRA adapters (peft) and merging, the finetune loop, torchrun (DDP / FSDP2 on gloo),
resume after SIGKILL, atomic checkpoints. Everything on the debug model and a dozen world renders."""
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import glmimage
from glmimage import finetune, lora
from glmimage.cli import main as cli
from glmimage.data.folder import load_items
from glmimage.dit.model import fill_zero_params

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_data(root: Path, n: int = 12) -> Path:
    """World renders with their captions; every third one wide (another aspect-ratio bucket)."""
    from glmimage.world import caption, sample_scene
    from glmimage.world.render import render

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        scene = sample_scene(rng)
        im = render(scene, 64)
        if i % 3 == 0:
            im = im.resize((128, 36))
        im.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(caption(scene, rng))
    return root


def make_edits(root: Path, n: int = 8) -> Path:
    """World edit pairs as a JSONL manifest of {"image": after, "source": before, "caption": instruction}."""
    from glmimage.world import sample_edit
    from glmimage.world.render import render

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    lines = []
    for i in range(n):
        e = sample_edit(rng)
        render(e.source, 64).save(root / f"{i}_src.png")
        render(e.target, 64).save(root / f"{i}_tgt.png")
        lines.append(json.dumps({"image": f"{i}_tgt.png", "source": f"{i}_src.png", "caption": e.instruction}))
    (root / "edits.jsonl").write_text("\n".join(lines) + "\n")
    return root / "edits.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("ftdata") / "images")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The debug model with a DiT that makes a velocity (training init zeroes its gates and output, so no gradient
    would reach a LoRA adapter inside the blocks)."""
    pipe = glmimage.load("debug", device="cpu")
    fill_zero_params(pipe.dit)
    return glmimage.save(pipe, tmp_path_factory.mktemp("base") / "model")


def load_base(path: Path):
    return glmimage.load(path, device="cpu")


def run_cfg(out: Path, data: Path, model: Path, **kw) -> finetune.FinetuneConfig:
    base = dict(model=str(model), data=str(data), out=str(out), cache=str(out.parent / "cache"), steps=4,
                batch_size=4, lr=1e-3, warmup=1, target="both", bf16=False, log_every=1, sample_every=100,
                ckpt_every=2, n_samples=2)
    return finetune.FinetuneConfig().with_overrides(**{**base, **kw})


def losses(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss") or k == "step"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_losses_close(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (ra, rb)


def assert_adapters_close(a: dict, b: dict, tol: float = 1e-3) -> None:
    """Relative distance of the whole adapter. Not element-wise: Adam divides by sqrt(v), so summation-order noise
    in a near-zero gradient can move a single weight by up to one lr step."""
    assert a.keys() == b.keys()
    num = sum((a[k] - b[k]).pow(2).sum() for k in a)
    den = sum(b[k].pow(2).sum() for k in b)
    assert (num / den).sqrt() < tol, float((num / den).sqrt())


def finetune_args(out: Path, data: Path, model: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--cache",
            str(out.parent / "cache"), "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--target", "both",
            "--ckpt-every", "2", "--sample-every", "100", "--set", "bf16=false", "--set", "log_every=1",
            "--set", "warmup=1", "--set", "n_samples=2", *extra]


def torchrun(n: int, args: list[str], timeout: int = 300) -> None:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(29500 + random.randrange(400)),
           "-m", "glmimage", *args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_webdataset_shards_read_like_the_folder(data, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for f in sorted(data.iterdir()):
            tar.add(f, arcname=f"sample{f.stem}.{f.suffix[1:]}")
    folder, shards = load_items(data), load_items(shard)
    assert [i.caption for i in shards] == [i.caption for i in folder]
    assert all(i.member for i in shards)
    a = np.asarray(finetune.open_image(shards[3]))
    b = np.asarray(Image.open(folder[3].image).convert("RGB"))
    assert np.array_equal(a, b)
    assert len(load_items(tmp_path)) == len(folder)  # a folder of shards


def test_shard_without_captions_is_refused(tmp_path):
    shard = tmp_path / "bad.tar"
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(img)
    with tarfile.open(shard, "w") as tar:
        tar.add(img, arcname="a.png")
    with pytest.raises(ValueError, match="no .txt or .json caption"):
        load_items(shard)
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all")
    with pytest.raises(ValueError, match="cannot read shard"):
        load_items(tmp_path / "junk.tar")


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
def _random_adapter(pipe, component: str, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inject an adapter, give its B matrices random values (peft starts them at zero), return peft's tensors."""
    module = getattr(pipe, component)
    params = lora.add(module, component, rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora.adapter_state(module, module.state_dict())


def _dit_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.cfg.dit.in_channels, 8, 8, generator=g)
    prior = torch.randint(0, pipe.cfg.dit.codebook_size, (1, 16), generator=g)
    glyph = torch.randn(1, 3, pipe.cfg.dit.glyph_dim, generator=g)
    with torch.no_grad():
        return pipe.dit(x, torch.tensor([500.0]), prior_ids=prior, prior_drop=torch.tensor([False]), glyph=glyph,
                        target_size=torch.tensor([[64.0, 64.0]]), glyph_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_adapter_equals_the_live_adapter(tmp_path, scale):
    live = glmimage.load("debug", device="cpu")
    fill_zero_params(live.dit)
    base_out = _dit_out(live)
    tensors = _random_adapter(live, "dit")
    from peft.tuners.lora import LoraLayer

    for m in live.dit.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", scale)
    live_out = _dit_out(live)
    assert (live_out - base_out).abs().max() > 1e-3  # the adapter changes the output
    path = lora.save(tmp_path / "a.safetensors", {"dit": tensors}, rank=4, alpha=8.0, base_model="debug")
    merged = glmimage.load("debug", device="cpu")
    fill_zero_params(merged.dit)
    lines = lora.apply(merged, [f"{path}:{scale}"])
    assert "rank 4" in lines[0]
    assert not any("lora" in k for k in merged.dit.state_dict())  # plain layers again
    torch.testing.assert_close(_dit_out(merged), live_out, rtol=1e-4, atol=1e-5)


def test_two_adapters_add_up(tmp_path):
    donor = glmimage.load("debug", device="cpu")
    a = lora.save(tmp_path / "a.safetensors", {"ar": _random_adapter(donor, "ar", seed=1)}, rank=4, alpha=8.0,
                  base_model="debug")
    donor = glmimage.load("debug", device="cpu")
    b = lora.save(tmp_path / "b.safetensors", {"ar": _random_adapter(donor, "ar", seed=2)}, rank=4, alpha=8.0,
                  base_model="debug")
    base = glmimage.load("debug", device="cpu")
    w0 = base.ar.layers[0].self_attn.q_proj.weight.clone()
    deltas = []
    for spec in ([str(a)], [str(b)], [str(a), str(b)]):
        p = glmimage.load("debug", device="cpu")
        lora.apply(p, spec)
        deltas.append(p.ar.layers[0].self_attn.q_proj.weight - w0)
    torch.testing.assert_close(deltas[2], deltas[0] + deltas[1], rtol=1e-5, atol=1e-6)


def test_merge_writes_the_official_layout(ref_dir, tmp_path):
    """`glmimage merge --to official` on a model in the official layout: the merged DiT and AR round-trip."""
    folder, _ = ref_dir
    donor = glmimage.load(folder, device="cpu")
    tensors = {c: _random_adapter(donor, c, seed=i) for i, c in enumerate(("ar", "dit"))}
    adapter = lora.save(tmp_path / "a.safetensors", tensors, rank=4, alpha=8.0, base_model=str(folder))
    assert cli(["merge", "--model", str(folder), "--lora", f"{adapter}:0.5", "--out", str(tmp_path / "off"),
                "--to", "official"]) == 0
    exported = glmimage.load(tmp_path / "off", device="cpu")
    direct = glmimage.load(folder, device="cpu")
    lora.apply(direct, [f"{adapter}:0.5"])
    base = glmimage.load(folder, device="cpu")
    for c in ("ar", "dit"):
        got, want, orig = (getattr(p, c).state_dict() for p in (exported, direct, base))
        assert any(not torch.equal(want[k], orig[k]) for k in want)  # the merge changed something
        for k in want:
            torch.testing.assert_close(got[k], want[k])


def test_bad_adapters_are_refused(tmp_path):
    pipe = glmimage.load("debug", device="cpu")
    with pytest.raises(ValueError, match="not found"):
        lora.apply(pipe, [str(tmp_path / "missing.safetensors")])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors adapter"):
        lora.apply(pipe, [str(tmp_path / "junk.safetensors")])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a glmimage LoRA adapter"):
        lora.apply(pipe, [str(tmp_path / "plain.safetensors")])
    donor = glmimage.load("debug", device="cpu")
    good = _random_adapter(donor, "dit", rank=4)
    wrong = {k: v[:, :2] if "lora_A" in k else v for k, v in good.items()}  # another model's shapes
    path = lora.save(tmp_path / "wrong.safetensors", {"dit": wrong}, rank=4, alpha=4.0, base_model="other")
    with pytest.raises((ValueError, RuntimeError)):
        lora.apply(pipe, [str(path)])
    assert lora.parse_spec("runs/a.safetensors:0.7") == (Path("runs/a.safetensors"), 0.7)
    assert lora.parse_spec("C:/x/a.safetensors") == (Path("C:/x/a.safetensors"), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The finetune loop
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(data, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "lora"
    finetune.main(run_cfg(out, data, base, sample_every=2, ema=0.9))
    return out


def test_lora_finetune_writes_adapter_samples_and_logs(lora_run):
    out = lora_run
    meta, tensors = lora.read(out / "adapter.safetensors")
    assert meta["components"] == ["ar", "dit"] and meta["rank"] == 16
    assert any(v.abs().max() > 0 for k, v in tensors["dit"].items() if "lora_B" in k)  # it trained
    rows = losses(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(np.isfinite(r["loss_ar"]) for r in rows)
    for f in ("samples.png", "loss.png", "samples/base_0.png", "samples/step_000002.png", "ckpt/state.json"):
        assert (out / f).is_file(), f
    sheet = np.asarray(Image.open(out / "samples.png").convert("L"), dtype=np.float32)
    assert sheet.std() > 10  # images, not a blank sheet
    assert len(list((out.parent / "cache").glob("*.safetensors"))) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds_per_step"] > 0 and summary["peak_memory_mib"]["cpu"] > 100
    assert summary["trained_parameters"] == sum(v.numel() for sd in tensors.values() for v in sd.values())


def test_generate_and_merge_with_the_adapter(lora_run, base, tmp_path, capsys):
    adapter = lora_run / "adapter.safetensors"
    outs = []
    for spec in ([], [f"{adapter}:0"], [f"{adapter}:1"]):
        png = tmp_path / f"{len(outs)}.png"
        args = ["generate", "a red circle", "--model", str(base), "-o", str(png), "--quiet"]
        for s in spec:
            args += ["--lora", s]
        assert cli(args) == 0
        outs.append(np.asarray(Image.open(png), dtype=np.int16))
    assert np.array_equal(outs[0], outs[1])  # scale 0 is the base model
    assert np.abs(outs[2] - outs[0]).mean() > 0.5  # the adapter changes the image
    assert cli(["merge", "--model", str(base), "--lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = glmimage.load(tmp_path / "merged", device="cpu")
    direct = load_base(base)
    lora.apply(direct, [str(adapter)])
    for a, b in zip(merged.dit.state_dict().values(), direct.dit.state_dict().values()):
        assert torch.equal(a, b)
    assert cli(["generate", "x", "--model", "debug", "--lora", str(tmp_path / "none.safetensors")]) == 2
    assert "LoRA adapter not found" in capsys.readouterr().err


def test_edit_pairs_finetune_image_to_image(base, tmp_path):
    manifest = make_edits(tmp_path / "edits")
    out = tmp_path / "run"
    finetune.main(run_cfg(out, manifest, base, steps=2, n_samples=2, sample_every=2))
    rows = losses(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss_ar"]) and np.isfinite(r["loss_dit"]) for r in rows)
    cached = load_file(str(next((tmp_path / "cache").glob("*.safetensors"))))
    assert {"src_ids", "src_latents", "src_pixels"} <= cached.keys()
    sheet = Image.open(out / "samples.png")
    assert sheet.height > 4 * 128  # sources | targets | base | tuned
    lines = manifest.read_text().splitlines()
    folder = manifest.parent
    (folder / "mixed.jsonl").write_text(lines[0] + "\n" + json.dumps({"image": "0_tgt.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="separate manifests"):
        load_items(folder / "mixed.jsonl")
    (folder / "nosrc.jsonl").write_text(lines[0].replace("0_src.png", "missing.png"))
    with pytest.raises(ValueError, match="source image not found"):
        load_items(folder / "nosrc.jsonl")


def test_pretokenized_cache_is_reused(lora_run, data, base, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "encode_item", lambda *a: calls.append(a))
    out = lora_run.parent / "again"
    finetune.main(run_cfg(out, data, base, steps=1, sample_every=100, n_samples=0))
    assert calls == []  # every item came from the cache


@pytest.mark.parametrize("target", ["dit", "ar"])
def test_full_finetune_writes_a_model_that_changed_only_its_target(data, base, tmp_path, target):
    out = tmp_path / "full"
    finetune.main(run_cfg(out, data, base, method="full", target=target, steps=2, n_samples=0))
    tuned, ref = glmimage.load(out / "model", device="cpu"), load_base(base)
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                        b.state_dict().values()))
    other = "ar" if target == "dit" else "dit"
    assert changed(getattr(tuned, target), getattr(ref, target))
    assert not changed(getattr(tuned, other), getattr(ref, other))
    assert not changed(tuned.vae.model, ref.vae.model)


def test_grad_checkpointing_and_accumulation_give_the_same_losses(data, base, tmp_path):
    finetune.main(run_cfg(tmp_path / "plain", data, base, steps=2, n_samples=0))
    finetune.main(run_cfg(tmp_path / "ckpt", data, base, steps=2, n_samples=0, grad_checkpointing=True,
                          grad_accum=2))
    assert_losses_close(losses(tmp_path / "plain"), losses(tmp_path / "ckpt"))


def test_bad_finetune_options_are_refused(data, base, tmp_path, capsys):
    for kw, msg in ((dict(batch_size=6, grad_accum=4), "multiple of"), (dict(batch_size=64), "larger than every"),
                    (dict(data=""), "--data is required"), (dict(data=str(tmp_path / "nope")), "not found")):
        with pytest.raises(ValueError, match=msg):
            finetune.main(run_cfg(tmp_path / "bad", kw.pop("data", data), base, **kw))
    assert cli(["finetune", "--model", str(base), "--data", str(data), "--set", "rank=0",
                "--out", str(tmp_path / "bad2")]) == 2
    assert "rank" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown option"):
        finetune.FinetuneConfig().with_overrides(rnak=4)


def test_interrupted_checkpoint_write_keeps_the_previous_one(data, base, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    finetune.main(run_cfg(out, data, base, steps=2, n_samples=0))
    before = {f.name: f.read_bytes() for f in (out / "ckpt").iterdir()}

    def dies(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(finetune, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(run_cfg(out, data, base, steps=4, n_samples=0))
    assert {f.name: f.read_bytes() for f in (out / "ckpt").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".ckpt")]  # no half-written folder left
    monkeypatch.undo()
    # killed between the swap's two renames: only .ckpt.old is left; the next run puts it back and resumes from it
    (out / "ckpt").rename(out / ".ckpt.old")
    finetune.main(run_cfg(out, data, base, steps=4, n_samples=0))
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 4
    assert [r["step"] for r in losses(out)] == [0, 1, 2, 3]  # steps 0-1 kept from the first run, 2-3 resumed


# ---------------------------------------------------------------------------------------------------------------
# torchrun: 2 processes ≡ 1 process with the same global batch; resume across process counts; SIGKILL
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(data, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    finetune.main(run_cfg(out, data, base, steps=4, n_samples=0, ema=0.5))
    return out


@pytest.mark.parametrize("mode,extra", [("ddp", ["--set", "n_samples=0"]),
                                        ("fsdp", ["--grad-accum", "2", "--set", "n_samples=1"])])
def test_two_processes_match_one(single, data, base, tmp_path, mode, extra):
    """Same losses, same (EMA) adapter; under FSDP the sample grid is drawn by both processes from sharded weights."""
    out = tmp_path / mode
    torchrun(2, finetune_args(out, data, base, "--parallel", mode, "--ema", "0.5", *extra))
    assert_losses_close(losses(out), losses(single))
    if mode == "fsdp":
        assert (out / "samples.png").is_file()
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(single / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert_adapters_close(a, b)


def test_checkpoint_resumes_on_another_number_of_processes(single, data, base, tmp_path):
    out = tmp_path / "resharded"
    torchrun(2, finetune_args(out, data, base, "--parallel", "fsdp", "--set", "n_samples=0", "--steps", "2",
                              "--ema", "0.5"))
    finetune.main(run_cfg(out, data, base, steps=4, n_samples=0, ema=0.5))  # steps 2..3 in one process
    assert_losses_close(losses(out), losses(single))
    assert_adapters_close(load_file(str(out / "adapter.safetensors")), load_file(str(single / "adapter.safetensors")))


def test_sigkill_at_a_random_step_resumes_to_the_same_losses(data, base, tmp_path):
    def args(out):
        return finetune_args(out, data, base, "--set", "n_samples=0", "--ckpt-every", "1", "--steps", "4")

    run = lambda out: subprocess.run([sys.executable, "-m", "glmimage", *args(out)], env=ENV, check=True,
                                     capture_output=True)
    run(tmp_path / "whole")  # the same process setup (threads) as the killed run: bit-exact losses expected
    out = tmp_path / "killed"
    kill_after = random.Random().randint(1, 3)  # steps logged before the kill
    p = subprocess.Popen([sys.executable, "-m", "glmimage", *args(out)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL  # killed mid-run, not finished
    run(out)
    assert losses(out) == losses(tmp_path / "whole")
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
