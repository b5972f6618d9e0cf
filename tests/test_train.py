"""Training stages on the `quick` recipe: every stage runs, writes its outputs, and resumes to the same losses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glmimage
from glmimage import train
from glmimage.ar import generate as argen
from glmimage.checkpoint import EMBEDDED, model_folder
from glmimage.cli import main as cli
from glmimage.train.data import (COLORS, GRADIENTS, N_BG, N_SHAPE, PARTS, SHAPES, Dataset, scene_graphs,
                                 token_codes)
from glmimage.train.tokenizer import load_trained, read_ids
from glmimage.world import all_captions
from glmimage.world import sample_scene


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """`train all --quick` once: data, vae, tokenizer, ar, dit, then the assembled model."""
    out = tmp_path_factory.mktemp("run")
    assert cli(["train", "all", "--quick", "--out", str(out)]) == 0
    return out


def test_all_stages_write_their_outputs(run_dir):
    for stage, files in {"vae": ["vae.safetensors", "vae.json", "latents_scenes.npy", "latents_source.npy"],
                         "tokenizer": ["vq.safetensors", "ids_scenes.npy", "ids_preview.npy", "ids_target.npy",
                                       "code_patches.npy"],
                         "ar": ["ar.safetensors"], "dit": ["dit.safetensors", "glyph.safetensors"]}.items():
        d = run_dir / stage
        for f in files + ["loss.png", "samples.png", "metrics.jsonl", "train_config.json", "ckpt/state.json"]:
            assert (d / f).is_file(), f"{stage}: missing {f}"
        assert list((d / "tb").glob("events.out.tfevents.*")), f"{stage}: no TensorBoard events"
        sheet = np.asarray(Image.open(d / "samples.png").convert("RGB"), dtype=np.float32)
        assert sheet.std() > 5, f"{stage}: blank sample grid"
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(v) for r in rows for v in r.values()), f"{stage}: bad metrics"


def test_loss_curves_draw_every_logged_key(tmp_path):
    """A DiT step logs loss_t2i or loss_i2i and options add keys mid-run: every key gets its curve (the plot once
    took its keys from the first row only, so the main loss of a resumed run went missing)."""
    from glmimage.train.common import Log

    log = Log(tmp_path, start_step=0)
    for step in range(40):
        log.scalars(step, **({"loss_t2i": 1.0 / (step + 1)} if step % 4 else {"loss_i2i": 0.5}),
                    **({"glyph_pos": 0.1} if step >= 30 else {}), grad_norm=1.0, lr=1e-3)
    curves = log.curves()
    assert list(curves) == ["loss_i2i", "grad_norm", "loss_t2i", "glyph_pos"]
    assert curves["loss_t2i"][0] == [s for s in range(40) if s % 4] and curves["glyph_pos"][0] == list(range(30, 40))
    assert curves["loss_t2i"][1][0] == 0.5 and all(np.isfinite(curves["loss_i2i"][1]))
    png = np.asarray(Image.open(log.plot("test")).convert("RGB"))
    assert png.shape[1] >= 4 * 4 * 90 * 0.9  # one panel per key
    log.close()


def test_stage_outputs_are_consistent(run_dir):
    scenes = Dataset(run_dir / "data" / "scenes")
    n = len(scenes)
    cfg = glmimage.config.preset("world")
    (th, tw), (ph, pw) = cfg.grids(64, 64)
    ids = np.load(run_dir / "tokenizer" / "ids_scenes.npy")
    assert ids.shape == (n, th * tw) and ids.min() >= 0 and ids.max() < cfg.vq.codebook_size
    assert np.load(run_dir / "tokenizer" / "ids_preview.npy").shape == (n, ph * pw)
    lat = np.load(run_dir / "vae" / "latents_scenes.npy")
    assert lat.shape == (n, cfg.dit.in_channels, 64 // cfg.vae_factor, 64 // cfg.vae_factor)
    # the ids are the scene graphs' semantic codes, and the graphs re-sampled from the recipe are the rendered ones
    graphs = scene_graphs(scenes)
    assert [all_captions(g) for g in graphs[:20]] == scenes["captions"][:20]
    assert scene_graphs(scenes, 7) == graphs[:7]  # the first n alone (the DiT's edit pairs with latents)
    edits = Dataset(run_dir / "data" / "edits")
    assert [e.instruction for e in scene_graphs(edits, 5)] == edits["instructions"][:5]
    assert ids[3].tolist() == token_codes(graphs[3], th).tolist()
    # the ViT's reading of the edit sources, which the AR's edit rows train on, is exactly what the assembled
    # pipeline reads from a condition image (its codebook's unseen rows completed as the model's are)
    pipe = glmimage.load(run_dir / "model", device="cpu")
    read = np.load(run_dir / "tokenizer" / "ids_source_read.npy")
    assert read.shape == (len(edits), th * tw)
    for i in (0, 7):
        _, got = pipe.condition_tokens(Image.fromarray(np.asarray(edits["source"][i])))
        assert got.flatten().tolist() == read[i].tolist()
    vq = load_trained(run_dir)  # and read_ids is that reading, for the ViT as trained
    assert read_ids(vq, edits["source"][:1], cfg.vq.image_mean, cfg.vq.image_std).shape == (1, th * tw)


def test_assembled_id_tables_fill_the_unseen_ids_from_their_factors(run_dir):
    """AR embedding and head, DiT prior rows and the ViT's codebook: rows of ids never seen in training (held-out
    shape–colour pairs) are the additive factor fit of the seen rows, the seen rows are the trained ones."""
    from safetensors.torch import load_file

    from glmimage.train.assemble import UNSEEN_ROWS, seen_codes
    from glmimage.train.data import NUM_CODES, factor_matrix

    seen = torch.zeros(NUM_CODES, dtype=torch.bool)
    seen[torch.from_numpy(seen_codes(run_dir).astype(np.int64))] = True
    assert 0 < (~seen).sum() < NUM_CODES
    shipped = load_file(str(run_dir / "model" / "model.safetensors"))
    trained = {"ar": load_file(str(run_dir / "ar" / "ar.safetensors")),
               "dit": load_file(str(run_dir / "dit" / "dit.safetensors")),
               "vq": load_file(str(run_dir / "tokenizer" / "vq.safetensors"))}
    x = factor_matrix().double()
    assert {c for c, _ in UNSEEN_ROWS} == set(trained)
    for comp, key in UNSEEN_ROWS:
        rows, before = shipped[f"{comp}.{key}"][:NUM_CODES].double(), trained[comp][key][:NUM_CODES].double()
        assert torch.allclose(rows[seen], before[seen].half().double()), (comp, key)
        fit = torch.linalg.lstsq(x[seen], before[seen], driver="gelsd").solution
        assert torch.allclose(rows[~seen], x[~seen] @ fit, atol=2e-3, rtol=1e-2), (comp, key)
        assert not torch.allclose(rows[~seen], before[~seen], atol=1e-3), (comp, key)


def test_semantic_codes_say_what_is_where():
    import random

    scene = sample_scene(random.Random(5), kind="single")
    (shape,) = scene.shapes
    codes = token_codes(scene, 4).reshape(4, 4)
    cx, cy = shape.center
    i, j = min(3, int(cy * 4)), min(3, int(cx * 4))
    k = int(codes[i, j]) - N_BG
    assert 0 <= k < N_SHAPE
    assert SHAPES[k // (len(COLORS) * PARTS * PARTS)] == shape.shape
    assert COLORS[k // (PARTS * PARTS) % len(COLORS)] == shape.color
    bg = codes[codes < N_BG]
    assert len(bg) >= 12 and (bg // GRADIENTS == COLORS.index(scene.background.color)).all()
    assert len(set(token_codes(scene, 4).tolist())) <= 5  # one background id (no gradient change) + ≤ 4 parts


def test_assembled_model_generates(run_dir):
    pipe = glmimage.load(run_dir / "model", device="cpu")
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.float32}  # stored fp16, computed in fp32
    out = pipe(["a red circle", 'a sign that says "OPEN"'], num_inference_steps=2, progress=False)
    assert [im.size for im in out.images] == [(64, 64)] * 2
    edit = pipe("recolor the circle to blue", images=[out.images[0]], num_inference_steps=2, progress=False)
    assert edit.images[0].size == (64, 64)
    weights = run_dir / "model" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}


@pytest.mark.parametrize("stage", ["vae", "tokenizer", "ar", "dit"])
def test_resume_gives_the_same_losses(run_dir, tmp_path, stage):
    """4 steps straight == 2 steps, stop, resume to 4 (model, optimizer, step and RNG restored)."""
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        for dep in ("data", "vae", "tokenizer"):
            shutil.copytree(run_dir / dep, tmp_path / name / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
        shutil.rmtree(tmp_path / name / stage, ignore_errors=True)
    kw = dict(log_every=1, sample_every=100, ckpt_every=2)
    if stage == "vae":  # `steps` alone (its decoder leg resumes in test_vae_decoder_leg_trains_the_decoder_alone...)
        kw["decoder_steps"] = 0
    train.run(stage, "quick", out=str(tmp_path / "straight"), steps=4, **kw)
    train.run(stage, "quick", out=str(tmp_path / "resumed"), steps=2, **kw)
    train.run(stage, "quick", out=str(tmp_path / "resumed"), steps=4, **kw)

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / stage / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss", r.get("loss_t2i", r.get("loss_i2i")))) for r in rows if "lr" in r]

    straight, resumed = losses("straight"), losses("resumed")
    assert [s for s, _ in straight] == [0, 1, 2, 3]
    assert straight == resumed


def test_train_all_runs_two_lanes_then_the_dit_on_both_cores(run_dir):
    """On a multi-core CPU `train all` runs vae → dit beside tokenizer ids → ViT → ar → the vae's decoder leg, one
    process each, then the DiT under torchrun on two processes to its last step; every job logs to <out>/logs/."""
    from safetensors.torch import load_file

    from glmimage.train.schedule import cores

    if cores() < 2:
        pytest.skip("one core: the stages run one after another")
    logs = {p.stem: p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log")}
    # lane B waits for lane A's vae before its decoder leg, so it always ends after it: the DiT has its lane
    assert set(logs) == {"data", "vae", "tokenizer-ids", "ar", "tokenizer", "vae-decoder", "dit-lane", "dit-ddp"}
    assert "Traceback" not in "".join(logs.values())
    state = json.loads((run_dir / "dit" / "ckpt" / "state.json").read_text())
    assert state["step"] == train.stage_config("dit", "quick").steps and not (run_dir / "dit" / "STOP").exists()
    # the decoder leg ran in its own job (lane A's vae stopped at the first leg), to the recipe's last step, and the
    # model has its decoder
    vae = train.stage_config("vae", "quick")
    assert vae.total_steps > vae.steps
    assert json.loads((run_dir / "vae" / "ckpt" / "state.json").read_text())["step"] == vae.total_steps
    steps = [json.loads(x)["step"] for x in (run_dir / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert {vae.steps - 1, vae.total_steps - 1} <= set(steps)  # each job logs its last step
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    final = load_file(str(run_dir / "vae" / "vae.safetensors"))
    assert all(torch.equal(model["vae." + k].float(), w.half().float()) for k, w in final.items())


@pytest.mark.parametrize("stage,final", [("vae", "vae.safetensors"), ("tokenizer", "vq.safetensors"),
                                         ("ar", "ar.safetensors"), ("dit", "dit.safetensors")])
def test_stop_file_pauses_a_stage_and_it_resumes(run_dir, tmp_path, stage, final):
    """<stage dir>/STOP: the stage checkpoints after its current step, removes the file and leaves no final weights;
    run again, it resumes there and finishes."""
    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, tmp_path / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    shutil.rmtree(tmp_path / stage, ignore_errors=True)
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "STOP").touch()
    kw = dict(out=str(tmp_path), steps=4, log_every=1, sample_every=100, ckpt_every=100)
    train.run(stage, "quick", **kw)
    state = json.loads((tmp_path / stage / "ckpt" / "state.json").read_text())
    assert state["step"] == 1 and not (tmp_path / stage / "STOP").exists() and not (tmp_path / stage / final).exists()
    train.run(stage, "quick", **kw)
    total = train.stage_config(stage, "quick", **kw).total_steps  # the vae's decoder leg runs on after the 4 steps
    assert json.loads((tmp_path / stage / "ckpt" / "state.json").read_text())["step"] == total
    assert (tmp_path / stage / final).is_file()
    rows = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "lr" in r] == list(range(total))


@pytest.mark.parametrize("stage", ["ar", "dit"])
def test_two_processes_train_like_one(run_dir, tmp_path, stage):
    """torchrun --nproc_per_node 2 -m glmimage train STAGE: DDP on gloo, each process half of the global batch ->
    the losses of one process (within float tolerance), checkpoints of the same step."""
    import os
    import random
    import subprocess
    import sys

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        for dep in ("data", "vae", "tokenizer"):
            shutil.copytree(run_dir / dep, tmp_path / name / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    args = [stage, "--quick", "--steps", "4", "--set", "log_every=1", "--set", "sample_every=100",
            "--set", "bf16=false", "--set", f"edit_fraction={0.5 if stage == 'dit' else 0.3}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "glmimage", "train", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                          str(29900 + random.randrange(90)), "-m", "glmimage", "train", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / stage / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss", r.get("loss_t2i", r.get("loss_i2i")))) for r in rows if "lr" in r]

    a, b = losses("one"), losses("two")
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 1, 2, 3]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
    assert json.loads((tmp_path / "two" / stage / "ckpt" / "state.json").read_text())["step"] == 4


def test_dit_noise_shift_draws_noisier_steps(run_dir, tmp_path, monkeypatch):
    """noise_shift > 1 moves the training times toward the noisy end (the DiT sees larger raw timesteps)."""
    from glmimage.dit.model import DiT

    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, tmp_path / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    seen = {}
    forward = DiT.forward

    def spy(self, x, t, **kw):
        seen.setdefault(key, []).append(t.detach().clone())
        return forward(self, x, t, **kw)

    monkeypatch.setattr(DiT, "forward", spy)
    for key, shift in (("plain", 1.0), ("shifted", 4.0)):
        shutil.rmtree(tmp_path / "dit", ignore_errors=True)
        train.run("dit", "quick", out=str(tmp_path), steps=3, edit_fraction=0.0, sample_every=100, noise_shift=shift)
    plain, shifted = torch.cat(seen["plain"]), torch.cat(seen["shifted"])
    assert shifted.shape == plain.shape and torch.all(shifted >= plain - 1e-3) and shifted.mean() > plain.mean() + 50


def test_dit_warm_restart_is_the_run_continued_from_its_model(run_dir, tmp_path):
    """restart_at=2 of 4 steps ≡ 2 steps, assemble, then `--set init=<that model> --set seed=1` for 2 more (how the
    shipped DiT's second leg ran), and a run stopped at the restart resumes to the same losses."""
    from glmimage.train.assemble import assemble

    for name in ("one", "first", "second", "resumed"):
        for dep in ("data", "vae", "tokenizer") + (("ar",) if name == "first" else ()):
            shutil.copytree(run_dir / dep, tmp_path / name / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    # warmup 1: the EMA (decay from step 1) differs from the raw weights at the restart; no glyph_aux (its training
    # head is not in a model folder, so a continued run starts a new one)
    kw = dict(log_every=1, sample_every=100, ckpt_every=2, warmup=1, glyph_aux=0.0, edit_fraction=0.5)
    train.run("dit", "quick", out=str(tmp_path / "one"), steps=4, restart_at=2, **kw)
    train.run("dit", "quick", out=str(tmp_path / "first"), steps=2, **kw)
    model = assemble(tmp_path / "first", dtype="float32", dest=tmp_path / "first" / "model")
    train.run("dit", "quick", out=str(tmp_path / "second"), steps=2, seed=1, init=str(model), **kw)
    train.run("dit", "quick", out=str(tmp_path / "resumed"), steps=2, restart_at=2, **kw)
    train.run("dit", "quick", out=str(tmp_path / "resumed"), steps=4, restart_at=2, **kw)

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "dit" / "metrics.jsonl").read_text().splitlines()
                if "lr" in x]

    def losses(name):
        return [r.get("loss_t2i", r.get("loss_i2i")) for r in rows(name)]

    one, two = losses("one"), losses("first") + losses("second")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5)
    assert losses("resumed") == one
    assert [r["lr"] for r in rows("one")][2:] == [r["lr"] for r in rows("second")]


def test_assemble_live_takes_the_checkpoints(run_dir, tmp_path):
    """`train assemble --live` builds the model from each stage's newest checkpoint (EMA for the DiT): at the end of
    a run that is the same model as the one assembled from the final files."""
    assert cli(["train", "assemble", "--out", str(run_dir), "--live", "--ship", str(tmp_path / "snap")]) == 0
    snap, final = glmimage.load(tmp_path / "snap", device="cpu"), glmimage.load(run_dir / "model", device="cpu")
    for comp in ("ar", "vq", "dit"):
        a, b = getattr(snap, comp).state_dict(), getattr(final, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), comp
    assert cli(["train", "assemble", "--out", str(tmp_path / "empty")]) == 2


def test_assemble_takes_what_the_run_did_not_train_from_a_base_model(run_dir, tmp_path):
    """`train assemble --base MODEL`: a run that retrained only the tokenizer and the AR gets the DiT, glyph encoder
    and VAE (and the VAE's latent statistics) from the base model; without a base it says what is missing."""
    out = tmp_path / "run"
    for dep in ("data", "tokenizer", "ar"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    from glmimage.train.assemble import assemble

    with pytest.raises(ValueError, match="no weights for dit"):
        assemble(out)
    with pytest.raises(ValueError, match="not a glmimage model folder"):
        assemble(out, base=tmp_path)
    assert cli(["train", "assemble", "--out", str(out), "--base", str(run_dir / "model"), "--ship",
                str(tmp_path / "m")]) == 0
    got, base = glmimage.load(tmp_path / "m", device="cpu"), glmimage.load(run_dir / "model", device="cpu")
    for comp in ("dit", "vae"):
        a, b = getattr(got, comp).state_dict(), getattr(base, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), comp  # the base's unseen rows are already completed
    a, b = got.glyph.encoder.state_dict(), base.glyph.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert got.cfg.vae == base.cfg.vae
    from safetensors.torch import load_file

    ar = load_file(str(out / "ar" / "ar.safetensors"))
    assert torch.equal(got.ar.state_dict()["layers.0.mlp.down_proj.weight"],
                       ar["layers.0.mlp.down_proj.weight"].half().float())


@pytest.mark.parametrize("stage,files", [("vae", {"vae": "vae.safetensors"}), ("tokenizer", {"vq": "vq.safetensors"}),
                                         ("ar", {"ar": "ar.safetensors"}),
                                         ("dit", {"dit": "dit.safetensors", "glyph": "glyph.safetensors"})])
def test_stage_continues_from_a_model(run_dir, tmp_path, stage, files):
    """`--set init=MODEL`: a run with no checkpoint starts from a model folder's weights (how a run continues
    from the last shipped model on a machine that has lost its checkpoints); 0 steps -> the model's own weights."""
    out = tmp_path / "run"
    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    shutil.rmtree(out / stage, ignore_errors=True)
    model = run_dir / "model"
    train.run(stage, "quick", out=str(out), steps=0, init=str(model))
    from safetensors.torch import load_file

    shipped = load_file(str(model / "model.safetensors"))
    for comp, name in files.items():
        got = load_file(str(out / stage / name))
        assert got and all(torch.equal(v, shipped[f"{comp}.{k}"].float()) for k, v in got.items()), comp
    if stage == "ar":  # the embedding rows belong to the model's text tokenizer
        assert (out / "ar" / "tokenizer.json").read_text() == (model / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="not a glmimage model folder"):
        train.run(stage, "quick", out=str(out), steps=0, init=str(tmp_path))
    glmimage.save(glmimage.load("debug", device="cpu"), tmp_path / "debug")  # another model's shapes
    with pytest.raises(ValueError, match="does not match"):
        train.run(stage, "quick", out=str(out), steps=0, init=str(tmp_path / "debug"))
    shutil.copytree(run_dir / stage / "ckpt", out / stage / "ckpt")  # a run with its own checkpoint resumes from it
    train.run(stage, "quick", out=str(out), init=str(tmp_path / "debug"))  # and never reads init


@pytest.mark.skipif(not (EMBEDDED / "config.json").is_file(), reason="embedded model not built")
def test_stage_continues_from_the_embedded_model(run_dir, tmp_path, monkeypatch):
    """`--set init=world` names the shipped model (unless a folder called world is at hand): every later session
    continues training from it."""
    out = tmp_path / "run"
    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    monkeypatch.chdir(tmp_path)
    assert model_folder("world") == EMBEDDED
    train.run("dit", "quick", out=str(out), steps=0, init="world")
    from safetensors.torch import load_file

    shipped, got = load_file(str(EMBEDDED / "model.safetensors")), load_file(str(out / "dit" / "dit.safetensors"))
    # a model from before the canvas (or before its shape channel) has no (or a narrower) canvas_embedder: the
    # columns it lacks start at zero (a DiT that does not read them)
    def same(k, v):
        if k != "canvas_embedder.weight":
            return torch.equal(v, shipped[f"dit.{k}"].float())
        have = shipped.get(f"dit.{k}", v[:, :0]).float()
        return torch.equal(v[:, :have.shape[1]], have) and not v[:, have.shape[1]:].any()

    assert got and all(same(k, v) for k, v in got.items())
    (tmp_path / "world").mkdir()
    assert model_folder("world") == Path("world")


def test_factored_init_starts_ids_that_share_a_factor_alike():
    from glmimage.train.data import NUM_CODES, factored_init_

    t = factored_init_(torch.zeros(NUM_CODES + 4, 512))
    assert t[NUM_CODES:].abs().sum() == 0  # rows past the semantic ids (specials, text) keep their own init
    assert abs(t[:NUM_CODES].std().item() - 0.02) < 0.002
    code = {(s, c, p): N_BG + (s * len(COLORS) + c) * PARTS * PARTS + p
            for s in range(len(SHAPES)) for c in range(len(COLORS)) for p in range(PARTS * PARTS)}
    cos = lambda a, b: torch.nn.functional.cosine_similarity(t[code[a]], t[code[b]], dim=0).item()
    assert cos((0, 0, 5), (0, 3, 5)) > 0.5  # same shape and part, other colour: shape·part + is_shape shared
    assert cos((0, 0, 5), (1, 3, 9)) < 0.5  # nothing but is_shape shared


def _source_readings(run_dir, out, deps):
    """Copy the stages `deps` of the quick run to `out`; -> {"read"|"true": its source-ids file}, {same: its rows}."""
    for dep in deps:
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    files = {"read": "ids_source_read.npy", "true": "ids_source.npy"}
    rows = {k: {tuple(r) for r in np.load(out / "tokenizer" / f).tolist()} for k, f in files.items()}
    assert rows["read"] != rows["true"]  # a 3-step ViT misreads
    return files, rows


def test_ar_edit_rows_read_their_source_as_the_vit_does(run_dir, tmp_path, monkeypatch):
    """The AR's edit rows are conditioned on the ids the trained ViT read from the source image (what the pipeline
    gives it), or on the scene graph's with edit_source=true; without the ViT's reading it says what to run."""
    out = tmp_path / "run"
    files, rows = _source_readings(run_dir, out, ("data", "tokenizer"))
    conds = []
    layout = argen.layout_prompt

    def spy(tok, text, *, cond=(), **kw):
        conds.extend(tuple(ids.tolist()) for ids, _, _ in cond)
        return layout(tok, text, cond=cond, **kw)

    monkeypatch.setattr(argen, "layout_prompt", spy)
    for source in ("read", "true"):
        conds.clear()
        shutil.rmtree(out / "ar", ignore_errors=True)
        train.run("ar", "quick", out=str(out), steps=2, edit_fraction=1.0, edit_source=source)
        assert len(conds) >= 2 * 8 and set(conds) <= rows[source], source
    (out / "tokenizer" / files["read"]).unlink()
    shutil.rmtree(out / "ar")
    with pytest.raises(ValueError, match="train tokenizer"):
        train.run("ar", "quick", out=str(out), steps=1)
    with pytest.raises(ValueError, match="edit_source"):
        train.run("ar", "quick", out=str(out), steps=1, edit_source="graph")


def test_ar_instruction_dropout_leaves_edit_rows_with_the_source_alone(run_dir, tmp_path, monkeypatch):
    """instruction_dropout trains that share of the image-to-image rows with an empty instruction (the
    unconditional row of AR guidance on edits); at 0 (the default) every edit row keeps its instruction."""
    out = tmp_path / "run"
    _source_readings(run_dir, out, ("data", "tokenizer"))
    texts = []
    layout = argen.layout_prompt

    def spy(tok, text, *, cond=(), **kw):
        if cond:
            texts.append(text)
        return layout(tok, text, cond=cond, **kw)

    monkeypatch.setattr(argen, "layout_prompt", spy)
    for p, lo, hi in ((0.0, 0, 0), (0.5, 8, 24), (1.0, 32, 32)):
        texts.clear()
        shutil.rmtree(out / "ar", ignore_errors=True)
        train.run("ar", "quick", out=str(out), steps=4, edit_fraction=1.0, instruction_dropout=p)
        assert len(texts) == 4 * 8 and lo <= texts.count("") <= hi, (p, texts.count(""))
    with pytest.raises(ValueError, match="instruction_dropout"):
        train.run("ar", "quick", out=str(out), steps=1, instruction_dropout=1.5)


def test_dit_edit_rows_read_their_source_as_chosen(run_dir, tmp_path, monkeypatch):
    """The DiT's image-to-image rows take the source's ids from the scene graph (default) or, with edit_source=read,
    the ids the trained ViT read from the source image, which is what the pipeline gives the condition image."""
    from glmimage.dit.model import DiT

    out = tmp_path / "run"
    files, rows = _source_readings(run_dir, out, ("data", "vae", "tokenizer"))
    seen = []
    kv = DiT.condition_kv_batched

    def spy(self, latents, prior_ids, target_size):
        n = int(prior_ids.shape[1] ** 0.5)  # the ×2 upsampled square grid back to the token grid
        seen.extend(tuple(r) for r in prior_ids.view(-1, n, n)[:, ::2, ::2].flatten(1).tolist())
        return kv(self, latents, prior_ids, target_size)

    monkeypatch.setattr(DiT, "condition_kv_batched", spy)
    for source in ("true", "read"):
        seen.clear()
        shutil.rmtree(out / "dit", ignore_errors=True)
        train.run("dit", "quick", out=str(out), steps=2, restart_at=0, edit_fraction=1.0, edit_source=source)
        assert len(seen) >= 2 * 8 and set(seen) <= rows[source], source
    (out / "tokenizer" / files["read"]).unlink()
    shutil.rmtree(out / "dit")
    with pytest.raises(ValueError, match="train tokenizer"):
        train.run("dit", "quick", out=str(out), steps=1, edit_source="read")
    with pytest.raises(ValueError, match="edit_source"):
        train.run("dit", "quick", out=str(out), steps=1, edit_source="graph")


def test_vae_edit_latents_encode_the_pairs_the_dit_draws_from(run_dir, tmp_path, monkeypatch):
    """edit_latents=N: the vae writes latents for the first N edit pairs only and the DiT's image-to-image rows draw
    from those, while the data (and the AR's and ViT's edit rows) may hold more pairs; bad values are refused
    before any training, and latents that do not fit the data are refused by the DiT."""
    from glmimage.dit.model import DiT

    out = tmp_path / "run"
    _source_readings(run_dir, out, ("data", "tokenizer"))
    n_pairs, k = len(Dataset(out / "data" / "edits")), 40
    for bad in (-1, n_pairs + 1):
        with pytest.raises(ValueError, match="edit_latents"):
            train.run("vae", "quick", out=str(out), edit_latents=bad)
        assert not (out / "vae" / "ckpt").exists()
    train.run("vae", "quick", out=str(out), edit_latents=k)
    src_lat = np.load(out / "vae" / "latents_source.npy")
    assert len(src_lat) == len(np.load(out / "vae" / "latents_target.npy")) == k < n_pairs
    seen = []
    kv = DiT.condition_kv_batched

    def spy(self, latents, prior_ids, target_size):
        n = int(prior_ids.shape[1] ** 0.5)
        seen.extend(tuple(r) for r in prior_ids.view(-1, n, n)[:, ::2, ::2].flatten(1).tolist())
        return kv(self, latents, prior_ids, target_size)

    monkeypatch.setattr(DiT, "condition_kv_batched", spy)
    train.run("dit", "quick", out=str(out), steps=4, restart_at=0, edit_fraction=1.0, edit_source="true")
    true_src = np.load(out / "tokenizer" / "ids_source.npy").tolist()
    assert len(seen) == 4 * 8 and set(seen) <= {tuple(r) for r in true_src[:k]}
    assert not set(seen) <= {tuple(r) for r in true_src[k:]}
    np.save(out / "vae" / "latents_target.npy", np.load(out / "vae" / "latents_target.npy")[:-1])
    shutil.rmtree(out / "dit")
    with pytest.raises(ValueError, match="train vae"):
        train.run("dit", "quick", out=str(out), steps=1)


def test_dit_edit_weight_weighs_the_tokens_an_edit_changes(run_dir, tmp_path):
    """edit_weight adds loss weight on an image-to-image row's latents whose token the edit changes (target id ≠
    source id), on top of fg_weight's under shapes and text; text-to-image rows and weight 0 keep the plain loss."""
    from glmimage.train.dit import loss_weight

    target = np.array([[0, N_BG, N_BG + 5, 1]])  # a 2×2 grid: background, two object tokens, background
    source = np.array([[0, N_BG, 2, 1]])  # the edit added the object in the third token
    w = loss_weight(target, source, (2, 2), 2, fg_weight=3.0, edit_weight=5.0)
    assert w.shape == (1, 1, 4, 4)
    assert w[0, 0, ::2, ::2].flatten().tolist() == [1.0, 4.0, 9.0, 1.0]
    assert torch.equal(w[0, 0, :2, 2:], torch.full((2, 2), 4.0))  # each token's f × f latents share its weight
    assert loss_weight(target, None, (2, 2), 2, 3.0, 5.0)[0, 0, ::2, ::2].flatten().tolist() == [1.0, 4.0, 4.0, 1.0]

    out = tmp_path / "run"
    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))

    def first_loss(**kw):
        shutil.rmtree(out / "dit", ignore_errors=True)
        train.run("dit", "quick", out=str(out), steps=1, restart_at=0, sample_every=100, **kw)
        row = json.loads((out / "dit" / "metrics.jsonl").read_text().splitlines()[0])
        return row.get("loss_i2i", row.get("loss_t2i"))

    plain = first_loss(edit_fraction=1.0)
    assert first_loss(edit_fraction=1.0, edit_weight=0.0) == plain
    assert first_loss(edit_fraction=1.0, edit_weight=4.0) > plain * 1.01  # the quick edits change tokens
    assert first_loss(edit_fraction=0.0, edit_weight=4.0) == first_loss(edit_fraction=0.0)
    with pytest.raises(ValueError, match="edit_weight"):
        train.run("dit", "quick", out=str(out), steps=1, edit_weight=-1.0)


def test_ar_edit_weight_weighs_the_tokens_an_edit_changes(run_dir, tmp_path):
    """edit_weight gives an image-to-image row's target ids that differ from its source grid 1 + W of the loss
    (the rest 1), normalised by the summed weights: edits that change every id or none train as without it, the
    world's edits (some ids changed) weigh their changes and log the plain cross entropy beside; text-to-image rows
    untouched; a negative or non-finite weight refused."""
    from glmimage.tokenizer.text import TextTokenizer
    from glmimage.train.ar import edit_weights, make_batch, target_weights

    src, tgt = torch.tensor([3, 4, 5, 6]), torch.tensor([3, 9, 5, 7])
    assert edit_weights(src, tgt, 4.0).tolist() == [1.0, 5.0, 1.0, 5.0]
    tok = TextTokenizer.from_file(run_dir / "ar" / "tokenizer.json")
    prompt = argen.layout_prompt(tok, "a red circle", target=(2, 2), preview=None, cond=[(src, 2, 2)])
    short = argen.layout_prompt(tok, "", target=(2, 2), preview=None, cond=[(src, 2, 2)])
    _, _, targets = make_batch([(prompt, tgt), (short, tgt)], tok.pad_id)
    w = target_weights(targets, [edit_weights(src, tgt, 4.0), torch.ones(4)])
    assert torch.equal(targets[targets != -100], torch.cat([tgt, tgt]))  # the weights sit where the grid ids do
    assert w[0][targets[0] != -100].tolist() == [1.0, 5.0, 1.0, 5.0]
    assert w[1].sum() == 4 and w[targets == -100].sum() == 0

    out = tmp_path / "run"
    _source_readings(run_dir, out, ("data", "tokenizer"))
    tokdir = out / "tokenizer"
    source, edited = np.load(tokdir / "ids_source.npy"), np.load(tokdir / "ids_target.npy")

    def first_step(target: np.ndarray, edit_fraction: float = 1.0, **kw) -> dict:
        """The first step's metrics with the true source grids (edit_source=true) and these target grids."""
        np.save(tokdir / "ids_target.npy", target)
        shutil.rmtree(out / "ar", ignore_errors=True)
        train.run("ar", "quick", out=str(out), steps=1, edit_source="true", edit_fraction=edit_fraction,
                  sample_every=100, **kw)
        return json.loads((out / "ar" / "metrics.jsonl").read_text().splitlines()[0])

    everywhere = (source + 1) % (max(source.max(), edited.max()) + 1)  # every target id differs from its source's
    for target in (source, everywhere):  # one weight for every token: the weighted mean is the plain mean
        assert first_step(target, edit_weight=4.0)["loss"] == pytest.approx(first_step(target)["loss"], rel=1e-6)
    plain, weighted = first_step(edited), first_step(edited, edit_weight=4.0)  # the world's edits change some ids
    assert weighted["ce"] == pytest.approx(plain["loss"], rel=1e-6)  # the plain cross entropy, logged beside
    assert weighted["loss"] != pytest.approx(plain["loss"], rel=1e-3)  # the changed ids weigh more
    assert first_step(edited, edit_fraction=0.0, edit_weight=4.0)["loss"] == pytest.approx(
        first_step(edited, edit_fraction=0.0)["loss"], rel=1e-6)  # text-to-image rows: no source, no weights
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="edit_weight"):
            train.run("ar", "quick", out=str(out), steps=1, edit_weight=bad)


def test_vae_decoder_leg_trains_the_decoder_alone_and_resumes(run_dir, tmp_path):
    """decoder_steps: after `steps` the decoder alone trains on; the encoder and the latents stay the first leg's to
    the bit, the decoder moves; stopped at the leg's start or inside it, the run resumes with the same losses."""
    from safetensors.torch import load_file

    kw = dict(steps=2, decoder_steps=2, decoder_crop=64, decoder_batch_size=4, log_every=1, sample_every=100,
              ckpt_every=100)
    runs = {}
    for name in ("straight", "first", "resumed"):
        runs[name] = tmp_path / name
        shutil.copytree(run_dir / "data", runs[name] / "data")
    train.run("vae", "quick", out=str(runs["straight"]), **kw)
    train.run("vae", "quick", out=str(runs["first"]), **{**kw, "decoder_steps": 0})
    shutil.copytree(runs["first"] / "vae", runs["resumed"] / "vae")
    first_leg = {f: (runs["resumed"] / "vae" / f).stat() for f in ("latents_scenes.npy", "latents_source.npy",
                                                                    "latents_target.npy")}
    (runs["resumed"] / "vae" / "STOP").touch()  # the leg's first step, then a pause inside it
    train.run("vae", "quick", out=str(runs["resumed"]), **kw)
    assert json.loads((runs["resumed"] / "vae" / "ckpt" / "state.json").read_text())["step"] == 3
    train.run("vae", "quick", out=str(runs["resumed"]), **kw)
    # begun where the first leg ended, the leg keeps its latents (a DiT may be reading them: `train all`)
    for f, st in first_leg.items():
        now = (runs["resumed"] / "vae" / f).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f

    def losses(name):
        rows = [json.loads(x) for x in (runs[name] / "vae" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["lr"]) for r in rows if "lr" in r]

    straight = losses("straight")
    assert [s for s, *_ in straight] == [0, 1, 2, 3] and straight == losses("resumed")
    assert straight[2][2] == train.stage_config("vae", "quick").decoder_lr / 100  # its own warmup (quick: 100)
    first, last, resumed = (load_file(str(runs[n] / "vae" / "vae.safetensors"))
                            for n in ("first", "straight", "resumed"))
    assert all(torch.equal(last[k], resumed[k]) for k in last)
    assert all(torch.equal(first[k], last[k]) for k in first if not k.startswith("decoder."))
    assert any(not torch.equal(first[k], last[k]) for k in first if k.startswith("decoder."))
    for f in ("latents_scenes.npy", "latents_source.npy", "vae.json"):
        assert (runs["first"] / "vae" / f).read_bytes() == (runs["straight"] / "vae" / f).read_bytes(), f
        assert (runs["resumed"] / "vae" / f).read_bytes() == (runs["straight"] / "vae" / f).read_bytes(), f
    out = tmp_path / "latents_only"  # --steps 0: no leg at all (nor a check of its crop), the latents of its init
    shutil.copytree(run_dir / "data", out / "data")
    train.run("vae", "quick", out=str(out), **{**kw, "steps": 0, "decoder_crop": 30}, init=str(run_dir / "model"))
    assert not (out / "vae" / "metrics.jsonl").is_file() or "lr" not in (out / "vae" / "metrics.jsonl").read_text()
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    kept = load_file(str(out / "vae" / "vae.safetensors"))
    assert all(torch.equal(w, model["vae." + k].float()) for k, w in kept.items())
    out = tmp_path / "decoder_only"  # decoder_only: its steps are all the decoder's, no second leg after them
    shutil.copytree(run_dir / "data", out / "data")
    train.run("vae", "quick", out=str(out), **{**kw, "steps": 1}, decoder_only=True, init=str(run_dir / "model"))
    assert json.loads((out / "vae" / "ckpt" / "state.json").read_text())["step"] == 1
    for bad in (dict(decoder_steps=-1), dict(decoder_crop=30)):
        with pytest.raises(ValueError, match="decoder_"):
            train.run("vae", "quick", out=str(tmp_path / "bad"), **{**kw, **bad})


def test_train_all_progress_counts_every_step_a_stage_runs(tmp_path):
    """The minute line of `train all`: a stage's step of all it runs, the vae's decoder leg included."""
    from glmimage.train import common as C
    from glmimage.train.schedule import Runner

    r = Runner(str(tmp_path), "quick", {})
    for stage, sets, step in (("vae", dict(steps=3, decoder_steps=2), 3), ("ar", dict(steps=3), 1)):
        C.write_config(tmp_path / stage, train.stage_config(stage, "quick", **sets))
        (tmp_path / stage / "metrics.jsonl").write_text(json.dumps({"step": step}) + "\n")
        r.running[stage] = None
    r.running["dit-lane"] = None  # no files yet
    assert r.progress() == "vae 4/5 · ar 2/3 · dit-lane starting"


def test_vae_decoder_only_keeps_the_encoder_and_its_latents(run_dir, tmp_path):
    """decoder_only fine-tunes the decoder of a trained VAE: the encoder, the latent normalisation and the latents
    the DiT trained on stay the model's, to the bit; without a model to start from it says what to give."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(run_dir / "data", out / "data")
    model = run_dir / "model"
    train.run("vae", "quick", out=str(out), steps=3, init=str(model), decoder_only=True, lr=1e-2, warmup=1)
    new = load_file(str(out / "vae" / "vae.safetensors"))
    old = {k[len("vae."):]: v.float() for k, v in load_file(str(model / "model.safetensors")).items()
           if k.startswith("vae.")}
    enc = [k for k in old if k.startswith("encoder.")]
    assert enc and all(torch.equal(new[k], old[k]) for k in enc)
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("decoder."))
    cfg = json.loads((out / "vae" / "vae.json").read_text())
    ref = json.loads((model / "config.json").read_text())["vae"]
    assert cfg["latents_mean"] == ref["latents_mean"] and cfg["latents_std"] == ref["latents_std"]
    from glmimage.train.vae import encode_all

    images = Dataset(out / "data" / "scenes")["images"][:16]  # encoded by the model's own VAE
    ours = np.load(out / "vae" / "latents_scenes.npy")[:16].astype(np.float32)
    assert np.abs(ours - encode_all(glmimage.load(model).vae, images).astype(np.float32)).max() < 1e-2
    # a VAE-only run (no ids of its own) assembles onto its init: the new decoder, the rest the model's
    from glmimage.train.assemble import assemble

    got, base = glmimage.load(assemble(out, base=model, dest=tmp_path / "m")), glmimage.load(model)
    vae = got.vae.model.state_dict()
    assert all(torch.equal(vae[k], new[k].half().float()) for k in new if k.startswith("decoder."))
    for comp in ("ar", "vq", "dit"):
        a, b = getattr(got, comp).state_dict(), getattr(base, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), comp
    assert got.cfg.vae == base.cfg.vae
    shutil.rmtree(out / "vae")
    with pytest.raises(ValueError, match="init"):
        train.run("vae", "quick", out=str(out), steps=1, decoder_only=True)


def test_dit_and_ar_stages_take_factored_init(run_dir, tmp_path):
    out = tmp_path / "run"
    for dep in ("data", "vae", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb"))
    from safetensors.torch import load_file

    from glmimage.train.data import factor_matrix

    x = factor_matrix()
    for stage, name, key in (("dit", "dit.safetensors", "prior_embedding.weight"),
                             ("ar", "ar.safetensors", "embed_tokens.weight")):
        train.run(stage, "quick", out=str(out), steps=0, factor_init=True)
        rows = load_file(str(out / stage / name))[key][:len(x)].double()
        fit = torch.linalg.lstsq(x.double(), rows, driver="gelsd").solution  # rows = sums of factor vectors
        assert torch.allclose(x.double() @ fit, rows, atol=1e-6), stage


def test_tokenizer_factored_codebook_keeps_rows_sums_of_their_factors(run_dir, tmp_path):
    """factored_codebook: the ViT's codebook trains as factor vectors, and what it saves (and reads with) is their
    sums, so a held-out pair's row is its shape's plus its colour's; the plain codebook is not additive."""
    from safetensors.torch import load_file

    from glmimage.train.data import NUM_CODES, factor_matrix

    x = factor_matrix().double()

    def additive(rows: torch.Tensor) -> bool:
        fit = torch.linalg.lstsq(x, rows, driver="gelsd").solution
        return torch.allclose(x @ fit, rows, atol=1e-5)

    out = tmp_path / "run"
    for dep in ("data", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb", "vq.safetensors"))
    train.run("tokenizer", "quick", out=str(out), steps=2, factored_codebook=True)
    for f in ("vq.safetensors", "ckpt/model.safetensors"):
        rows = load_file(str(out / "tokenizer" / f))
        rows = rows.get("codebook.weight", rows.get("vq.codebook.weight"))[:NUM_CODES].double()
        assert additive(rows), f
    assert not additive(load_file(str(run_dir / "tokenizer" / "vq.safetensors"))["codebook.weight"][:NUM_CODES]
                        .double())


def test_factored_codebook_from_a_model_keeps_its_rows(run_dir, tmp_path):
    """factored_codebook from a trained model (init=MODEL) whose codebook is not additive: 0 steps keep its rows, and
    so its reading of the edit sources (the fit alone would change the ids the ViT reads); steps move the rows
    only in factor space."""
    from safetensors.torch import load_file

    from glmimage.train.data import NUM_CODES, factor_matrix

    model = run_dir / "model"
    shipped = load_file(str(model / "model.safetensors"))["vq.codebook.weight"].float()
    out = tmp_path / "run"
    for dep in ("data", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb", "vq.safetensors"))
    (out / "tokenizer" / "ids_source_read.npy").unlink()
    train.run("tokenizer", "quick", out=str(out), steps=0, init=str(model), factored_codebook=False)
    plain = np.load(out / "tokenizer" / "ids_source_read.npy")  # the model's own reading (its fp16 weights)
    shutil.rmtree(out / "tokenizer" / "ckpt", ignore_errors=True)
    (out / "tokenizer" / "ids_source_read.npy").unlink()
    train.run("tokenizer", "quick", out=str(out), steps=0, init=str(model), factored_codebook=True)
    rows = load_file(str(out / "tokenizer" / "vq.safetensors"))["codebook.weight"]
    assert torch.equal(rows, shipped)  # to the bit
    np.testing.assert_array_equal(np.load(out / "tokenizer" / "ids_source_read.npy"), plain)  # the fit alone: 6 %
    shutil.rmtree(out / "tokenizer" / "ckpt", ignore_errors=True)
    train.run("tokenizer", "quick", out=str(out), steps=2, init=str(model), factored_codebook=True)
    moved = (load_file(str(out / "tokenizer" / "vq.safetensors"))["codebook.weight"] - shipped)[:NUM_CODES].double()
    x = factor_matrix().double()
    off = (x @ torch.linalg.lstsq(x, moved, driver="gelsd").solution - moved).abs().max()
    assert moved.abs().max() > 1e-5 and off < 0.05 * moved.abs().max()  # float rounding only


def test_factored_codebook_resumes_a_checkpoint_of_the_old_layout():
    """A checkpoint written as rows = x @ factors + residual loads as the same rows, to the bit, and trains on."""
    from glmimage.train.data import NUM_CODES
    from glmimage.train.tokenizer import FactoredCodebook

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(NUM_CODES, 8, generator=g)
    old = {"factors": torch.randn(FactoredCodebook(rows).factors.shape, generator=g),
           "residual": torch.randn(rows.shape, generator=g)}
    fc = FactoredCodebook(rows)
    fc.load_state_dict(dict(old))
    assert torch.equal(fc(), fc.x @ old["factors"] + old["residual"])
    assert torch.equal(FactoredCodebook(rows, exact=True)(), rows)  # a fresh exact one starts on its rows
    fc().sum().backward()
    assert fc.factors.grad is not None and fc.factors.grad.abs().sum() > 0


def test_greyscale_batches_are_scored_on_all_but_colour(run_dir, tmp_path):
    """grey_fraction: a greyscale image is scored on the ids that differ from its target only in colour, so a
    reading right but for the colour costs what the right id costs; in colour, it costs the wrong id's loss."""
    from glmimage.train.data import code_factors, colour_classes
    from glmimage.train.tokenizer import colour_blind_loss, greyscale

    same = colour_classes()
    for code in (0, 7, 59, N_BG, N_BG + 500, N_BG + N_SHAPE - 1, N_BG + N_SHAPE, N_BG + N_SHAPE + 239):
        row = same[code].tolist()
        assert code in row and len(set(row)) == len(COLORS)
        for other in row:  # the same but for the colour (a background's one factor is colour × gradient)
            if code < N_BG:
                assert other < N_BG and other % GRADIENTS == code % GRADIENTS
            else:
                f = [x for x in code_factors(other) if "colour" not in x[0]]
                assert f == [x for x in code_factors(code) if "colour" not in x[0]], (code, other)
    red_circle = N_BG + ((SHAPES.index("circle") * len(COLORS) + COLORS.index("red")) * PARTS + 1) * PARTS + 2
    blue_circle = N_BG + ((SHAPES.index("circle") * len(COLORS) + COLORS.index("blue")) * PARTS + 1) * PARTS + 2
    red_square = N_BG + ((SHAPES.index("square") * len(COLORS) + COLORS.index("red")) * PARTS + 1) * PARTS + 2
    target = torch.full((1, 1), red_circle)
    for wrong, grey_costs in ((blue_circle, False), (red_square, True)):
        logits = torch.zeros(1, 1, 1456)
        logits[..., wrong] = 20.0
        grey, colour = colour_blind_loss(logits, target, 1, same), colour_blind_loss(logits, target, 0, same)
        assert colour > 15 and (grey > 15) == grey_costs, (wrong, grey, colour)

    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    g = greyscale(images, 2)
    assert (g[:2, ..., 0] == g[:2, ..., 2]).all() and (g[2] == images[2]).all() and not (g[:2] == images[:2]).all()

    out = tmp_path / "run"
    for dep in ("data", "tokenizer"):
        shutil.copytree(run_dir / dep, out / dep, ignore=shutil.ignore_patterns("ckpt", "tb", "vq.safetensors"))
    train.run("tokenizer", "quick", out=str(out), steps=2, grey_fraction=0.5, edit_images=True)
    assert (out / "tokenizer" / "vq.safetensors").is_file()
    with pytest.raises(ValueError, match="grey_fraction"):
        train.run("tokenizer", "quick", out=str(out), steps=3, grey_fraction=1.5)


def test_bf16_autocast_by_default_only_where_it_is_native(monkeypatch):
    from glmimage.train import common as C

    for native in (True, False):
        monkeypatch.setattr(C, "native_bf16", lambda device="cpu": native)
        with C.autocast(None):
            assert torch.is_autocast_enabled("cpu") == native
        with C.autocast(True):
            assert torch.is_autocast_enabled("cpu")
        with C.autocast(False):
            assert not torch.is_autocast_enabled("cpu")


def test_training_forward_uses_the_math_attention_kernel_on_cpu():
    """C.forward runs attention with the math kernel on a CPU (its backward is ~3x faster than the fused kernel's at
    our lengths: bench/train_attention.py), keeps autocast's choice, and gives the fused kernel's loss and gradients."""
    from torch.profiler import profile

    from glmimage.ar.model import ARModel
    from glmimage.config import preset
    from glmimage.train import common as C

    torch.manual_seed(0)
    model = ARModel(preset("debug").ar)
    ids = torch.randint(0, 200, (4, 24))
    pos = torch.arange(24).expand(3, 4, 24).contiguous()

    def loss_and_grads(context):
        model.zero_grad(set_to_none=True)
        with profile() as prof:
            with context:
                loss = model(ids, pos, None).float().logsumexp(-1).mean()
            loss.backward()
        ops = {e.key for e in prof.key_averages()}
        return loss.detach(), [p.grad.clone() for p in model.parameters()], ops

    fused_loss, fused_grads, fused_ops = loss_and_grads(C.autocast(False))
    math_loss, math_grads, math_ops = loss_and_grads(C.forward(False))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in fused_ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in math_ops
    assert "aten::_scaled_dot_product_attention_math" in math_ops
    torch.testing.assert_close(math_loss, fused_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(math_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with C.forward(True):
        assert torch.is_autocast_enabled("cpu")
    with C.forward(False):
        assert not torch.is_autocast_enabled("cpu")


def test_train_attention_bench_times_both_kernels(run_dir):
    """bench/train_attention.py times the attention call of every stage's shapes with each kernel, then runs stages
    on a finished run's files, stops them after their steps, and prints the seconds per step of each kernel."""
    import re
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "bench" / "train_attention.py"
    before = set(run_dir.parent.iterdir())  # the bench makes its scratch folders beside the run (hard links)
    out = subprocess.run([sys.executable, str(script), "--reps", "2", "--run", str(run_dir), "--recipe", "quick",
                          "--steps", "8", "--stages", "ar", "tokenizer"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    calls = re.findall(r"^\w[^:]*: .*\s(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d\d)$", out, re.M)
    assert len(calls) == 5 and all(float(x) > 0 for c in calls for x in c), out
    rows = re.findall(r"^(ar|tokenizer)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, re.M)
    assert [r[0] for r in rows] == ["ar", "tokenizer"], out
    assert all(float(x) > 0 for r in rows for x in r[1:]), out
    assert set(run_dir.parent.iterdir()) == before, "the scratch folders are removed"


def test_every_recipe_builds_its_stage_configs():
    """Each stage's recipes name only fields its config has; the world recipe's vae encodes no more edit pairs than
    its data stage makes, and its DiT's warm restart (if any) falls inside its steps."""
    for stage in train.STAGES:
        for recipe in train.RECIPES[stage]:
            train.stage_config(stage, recipe)
    assert train.stage_config("vae").edit_latents <= train.stage_config("data").n_edits
    dit = train.stage_config("dit")
    assert 0 <= dit.restart_at < dit.steps


def test_cli_train_rejects_bad_options(tmp_path, capsys):
    assert cli(["train", "ar", "--quick", "--out", str(tmp_path), "--set", "nonsense=1"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert cli(["train", "ar", "--quick", "--out", str(tmp_path), "--set", "lr"]) == 2


def test_stage_without_its_inputs_says_what_is_missing(tmp_path, capsys):
    assert cli(["train", "dit", "--quick", "--out", str(tmp_path)]) == 2
    assert "data" in capsys.readouterr().err


def test_eval_world_runs_and_reports(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli(["eval", "world", "--model", str(run_dir / "model"), "--n", "1", "--edits", "2", "--steps", "2",
                "--out", str(out)])
    assert code == 0
    report = json.loads((out / "world_eval.json").read_text())
    assert report["n_prompts"] == 5 and report["n_edits"] == 2 and report["n_texts"] >= 2
    for key in ("word_accuracy", "composition", "edit_success", "normalized_edit_distance"):
        assert 0.0 <= report[key] <= 1.0
    assert (out / "t2i_sheet.png").is_file() and (out / "edit_sheet.png").is_file()
    for e in report["edits"]:  # a missed target says what it missed (a 2-step DiT misses)
        assert e["target"] or (e["misses"] and all(isinstance(m, str) for m in e["misses"])), e
    table = capsys.readouterr().out
    assert "quoted-word accuracy" in table and "edit success" in table
    assert cli(["eval", "world", "--model", str(run_dir / "model"), "--n", "0", "--edits", "0"]) == 2
    # edits only (it once failed at the end, drawing a sheet of no text-to-image images)
    assert cli(["eval", "world", "--model", str(run_dir / "model"), "--n", "0", "--edits", "1", "--steps", "1",
                "--out", str(tmp_path / "edits")]) == 0
    report = json.loads((tmp_path / "edits" / "world_eval.json").read_text())
    assert report["n_prompts"] == 0 and report["n_edits"] == 1 and 0.0 <= report["edit_success"] <= 1.0
    table = capsys.readouterr().out
    assert "MISS" not in table.split("edit success")[0]  # nothing judged is no miss


def test_eval_world_true_ids_paints_the_scene_graphs(run_dir, tmp_path, capsys, monkeypatch):
    """--true-ids: every image is painted from its scene's token_codes (t2i) or its target scene's (edits), the AR
    never runs; a model without the world's codes is refused."""
    import glmimage.pipeline as P
    from glmimage.train.data import token_codes

    plans = []
    call = P.Pipeline.__call__

    def spy(self, prompt, *a, prior_ids=None, **kw):
        plans.append(prior_ids)
        return call(self, prompt, *a, prior_ids=prior_ids, **kw)

    monkeypatch.setattr(P.Pipeline, "__call__", spy)
    monkeypatch.setattr(argen, "generate", lambda *a, **k: pytest.fail("the AR ran under --true-ids"))
    out = tmp_path / "eval"
    assert cli(["eval", "world", "--model", str(run_dir / "model"), "--n", "1", "--edits", "1", "--steps", "1",
                "--true-ids", "--out", str(out)]) == 0
    report = json.loads((out / "world_eval.json").read_text())
    assert report["config"]["true_ids"] and "the DiT alone" in capsys.readouterr().out
    from glmimage.eval.world import EvalConfig, heldout_edits, heldout_prompts

    cfg = EvalConfig(n_per_kind=1, n_edits=1)
    want = [token_codes(s, 4) for _, s in heldout_prompts(cfg)] + [token_codes(heldout_edits(cfg)[0].target, 4)]
    got = [row.flatten().numpy() for p in plans for row in p]
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert cli(["eval", "world", "--model", "debug", "--n", "1", "--edits", "0", "--true-ids"]) == 2
    assert "semantic codes" in capsys.readouterr().err


def test_eval_judges_only_what_the_prompt_asks():
    from glmimage.eval.world import stated

    judged = {"count": True, "object": True, "colour": True, "position": False, "binding": False,
              "background": False}
    assert stated("a red circle", judged) == {"count": True, "object": True, "colour": True}
    kept = stated("a red circle in the top left corner on a white background", judged)
    assert kept == judged


def test_glyph_position_loss_teaches_the_glyph_encoder_where_each_letter_is():
    """The DiT stage's glyph_aux loss: positions line up with the glyph embeddings (same padding, several strings per
    prompt), and training on it makes each embedding say its index, which an encoder not trained on it does not
    (the world's glyph encoder trained by the DiT's loss alone read 21 % of indices)."""
    import random
    import string

    from glmimage.config import preset
    from glmimage.glyph import GlyphEncoder
    from glmimage.train.dit import MAX_GLYPH_POS, glyph_position_loss

    glyph = GlyphEncoder(preset("world").glyph)
    prompts = ['two words "AB" and "CDE"', "no quoted text", '"xyz"']
    _, valid = glyph(prompts)
    start, end = glyph.positions(prompts)
    assert torch.equal(start >= 0, valid) and torch.equal(end >= 0, valid)
    assert start[0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]  # "AB"+eos after a pad (even count), then "CDE"+eos
    assert end[0, :9].tolist() == [3, 2, 1, 0, 4, 3, 2, 1, 0]

    def index_accuracy(train_encoder: bool) -> float:
        torch.manual_seed(0)
        rng = random.Random(0)
        glyph = GlyphEncoder(dict(preset("world").glyph, d_model=64, d_kv=16, d_ff=128)).train()
        head = torch.nn.Linear(glyph.dim, 2 * MAX_GLYPH_POS)
        params = list(head.parameters()) + (list(glyph.parameters()) if train_encoder else [])
        opt = torch.optim.Adam(params, lr=3e-3)
        for step in range(401):
            texts = [f'a sign that says "{"".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, 5)))}"'
                     for _ in range(32)]
            gl, ok = glyph(texts)
            if step == 400:  # a fresh batch, read before training on it
                got = head(gl).view(*gl.shape[:2], 2, MAX_GLYPH_POS)[..., 0, :].argmax(-1)
                return (got == glyph.positions(texts)[0])[ok].float().mean().item()
            loss = glyph_position_loss(glyph, head, gl, texts) / ok.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    assert index_accuracy(train_encoder=False) < 0.6 < 0.95 < index_accuracy(train_encoder=True)
