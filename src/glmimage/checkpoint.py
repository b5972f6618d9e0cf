"""Checkpoints: our own format (config.json + model.safetensors + tokenizer.json), import of the official diffusers
layout (GlmImagePipeline folders, sharded safetensors), and export back to it. Never pickle; writes are atomic.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from glmimage.ar.model import ARConfig, ARModel
from glmimage.config import ModelConfig, SamplingConfig, ScheduleConfig, preset
from glmimage.dit.model import DiT, DiTConfig
from glmimage.glyph import GlyphEncoder
from glmimage.pipeline import Pipeline, log, native_bf16, resolve_device, resolve_dtype
from glmimage.tokenizer.text import TextTokenizer
from glmimage.tokenizer.vq import VisualTokenizer, VQConfig
from glmimage.vae import VAE

FORMAT = "glmimage/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Official key -> our key, per component. '*' stands for a layer index. Longest patterns first.
KEY_MAP: dict[str, list[tuple[str, str]]] = {
    "ar": [
        ("model.language_model.embed_tokens.", "embed_tokens."),
        ("model.language_model.layers.*.", "layers.*."),
        ("model.language_model.norm.", "norm."),
        ("lm_head.", "lm_head."),
    ],
    "vq": [
        ("model.visual.patch_embed.proj.", "patch_embed."),
        ("model.visual.embeddings.position_embedding.", "pos_embed."),
        ("model.visual.blocks.*.attn.qkv.", "blocks.*.qkv."),
        ("model.visual.blocks.*.attn.proj.", "blocks.*.proj."),
        ("model.visual.blocks.*.mlp.fc1.", "blocks.*.fc1."),
        ("model.visual.blocks.*.mlp.fc2.", "blocks.*.fc2."),
        ("model.visual.blocks.*.norm1.", "blocks.*.norm1."),
        ("model.visual.blocks.*.norm2.", "blocks.*.norm2."),
        ("model.vqmodel.quant_conv.", "quant_proj."),
        ("model.vqmodel.quantize.embedding.", "codebook."),
    ],
    "dit": [
        ("image_projector.proj.", "x_embedder."),
        ("glyph_projector.net.0.proj.", "glyph_embedder.fc1."),
        ("glyph_projector.net.2.", "glyph_embedder.fc2."),
        ("prior_token_embedding.", "prior_embedding."),
        ("prior_projector.net.0.proj.", "prior_projector.fc1."),
        ("prior_projector.net.2.", "prior_projector.fc2."),
        ("time_condition_embed.timestep_embedder.linear_1.", "t_embedder.timestep_mlp.fc1."),
        ("time_condition_embed.timestep_embedder.linear_2.", "t_embedder.timestep_mlp.fc2."),
        ("time_condition_embed.condition_embedder.linear_1.", "t_embedder.size_mlp.fc1."),
        ("time_condition_embed.condition_embedder.linear_2.", "t_embedder.size_mlp.fc2."),
        ("transformer_blocks.*.norm1.linear.", "blocks.*.adaLN_modulation."),
        ("transformer_blocks.*.attn1.to_q.", "blocks.*.q_proj."),
        ("transformer_blocks.*.attn1.to_k.", "blocks.*.k_proj."),
        ("transformer_blocks.*.attn1.to_v.", "blocks.*.v_proj."),
        ("transformer_blocks.*.attn1.to_out.0.", "blocks.*.o_proj."),
        ("transformer_blocks.*.ff.net.0.proj.", "blocks.*.mlp.fc1."),
        ("transformer_blocks.*.ff.net.2.", "blocks.*.mlp.fc2."),
        ("norm_out.linear.", "final_adaLN."),
        ("proj_out.", "final_layer."),
    ],
}
EMBEDDED = Path(__file__).parent / "assets" / "world"  # the shipped world model (glmimage format, fp16)
TIED_T5 = "encoder.embed_tokens.weight"  # T5 ties the encoder embedding to shared.weight


def _tie_t5(state: dict[str, torch.Tensor]) -> None:
    if "shared.weight" in state:
        state[TIED_T5] = state["shared.weight"]


IGNORED_OFFICIAL = ("model.vqmodel.post_quant_conv.",)  # exists in the official AR checkpoint, never used


def _compile(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for off, ours in pairs:
        src, dst = (ours, off) if reverse else (off, ours)
        out.append((re.compile("^" + re.escape(src).replace(r"\*", r"(\d+)")), dst.replace("*", r"\1", 1)))
    return out


def map_key(key: str, component: str, *, to_official: bool = False) -> str | None:
    """Translate one tensor name between the official layout and ours; None when it has no counterpart."""
    for pat, repl in _compile(KEY_MAP[component], to_official):
        if pat.match(key):
            return pat.sub(repl, key, count=1)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Safe tensor I/O
# ---------------------------------------------------------------------------------------------------------------
EMBEDDING_TABLES = ("embed_tokens.weight", "prior_embedding.weight", "prior_token_embedding.weight")
_MAPPABLE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _map_tables(f: Path, keys: list[str], cast) -> dict[str, torch.Tensor]:
    """Views of a private (copy-on-write) memory map of `f` for those of `keys` that are embedding tables stored in
    the dtype they are used in. A table is read a few rows at a time (the ids of one prompt), so its untouched rows
    never become resident: 97 MiB of the 376 + 420 MiB of the AR and DiT at `small` in fp32, as the reference's
    memory-mapped loading. Writes to a view never reach the file; the file may be replaced (saves write a new file
    and rename it), not rewritten in place."""
    tables = [k for k in keys if k.endswith(EMBEDDING_TABLES)]
    if not tables:
        return {}
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    size, views, storage = f.stat().st_size, {}, None
    for k in tables:
        info = header.get(k, {})
        dt = _MAPPABLE.get(info.get("dtype"))
        if dt is None or cast(k, torch.empty(0, dtype=dt, device="meta")).dtype != dt:
            continue  # cast as it is read instead (a bf16 model of an fp32 file holds the bf16 table only)
        start, end = (8 + n + o for o in info["data_offsets"])
        shape, item = info["shape"], dt.itemsize
        if start % item or end > size or end - start != item * math.prod(shape):
            continue  # misaligned or inconsistent: the reader below checks and reads it
        if storage is None:
            storage = torch.UntypedStorage.from_file(str(f), shared=False, nbytes=size)
        views[k] = torch.empty(0, dtype=dt).set_(storage, start // item, shape)
    return views


def read_safetensors(files: list[Path], keep=None, cast=None) -> dict[str, torch.Tensor]:
    """Read every tensor of the given files (those whose name passes `keep`, when given), each passed through
    `cast(name, tensor)` as soon as it is read (a bf16 model never holds its fp32 copy); embedding tables already
    in their dtype are memory-mapped instead (`_map_tables`). Missing, truncated or pickle files raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{f}: pickle checkpoints are never loaded (arbitrary code execution); "
                             "convert it to safetensors")
        if not f.is_file():
            raise ValueError(f"weight file not found: {f}")
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = [k for k in st.keys() if keep is None or keep(k)]
            mapped = _map_tables(f, keys, cast if cast is not None else (lambda k, t: t))
            out.update(mapped)
            keys = [k for k in keys if k not in mapped]
            while keys:
                # Reopened every 64 MiB: the file's pages mapped so far are released, so the peak resident memory
                # is the weights plus 64 MiB, not twice the weights (256 MiB windows: +75 MiB of peak at `small`).
                with safe_open(str(f), framework="pt") as st:
                    read = 0
                    while keys and read < 64 * 2**20:
                        k = keys.pop(0)
                        t = st.get_tensor(k)
                        read += t.nbytes
                        c = cast(k, t) if cast is not None else t
                        out[k] = t.clone() if c is t else c  # fresh, aligned storage: same kernels as a trained model
        except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read weight file {f} (truncated or not safetensors?): {e}") from None
    return out


def _check_names(expected, names, what: str) -> None:
    """The checkpoint's tensor names for a module must be exactly the module's: else ValueError naming the gap."""
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")


def _tensor_names(files: list[Path]) -> list[str]:
    """The tensor names of safetensors files, from their headers (nothing is read)."""
    try:
        names = []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names += list(st.keys())
        return names
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read weight files {[str(f) for f in files]} (truncated or not safetensors?): "
                         f"{e}") from None


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with assign=True (meta-built modules); shape or name mismatches raise ValueError."""
    expected = module.state_dict()
    _check_names(expected, state, what)
    for k, v in state.items():
        if tuple(expected[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: tensor {k} has shape {tuple(v.shape)} in the checkpoint but the model "
                             f"expects {tuple(expected[k].shape)}")
    module.load_state_dict(state, strict=True, assign=True)


def recover_folder(final: Path) -> None:
    """Finish a swap `atomic_folder` was killed in the middle of: between its two renames only .NAME.old exists."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temp folder beside `final`; on success swap it in with renames (the old copy survives a crash),
    on failure remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yield a temp path beside `final`; on success rename it over `final` (a reader that has the old file open, or
    mapped, keeps reading the old one whole), on failure remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        yield Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    os.replace(name, final)


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def component_dtype(component: str, dtype: torch.dtype) -> torch.dtype:
    """What each component computes in: the AR, ViT and DiT in the pipeline's dtype; the glyph encoder in fp32
    (small; T5 overflows in fp16); the VAE in bf16 for a bf16 pipeline (fp32's range, half the decode time), else
    fp32 (its decoder overflows to NaN in fp16)."""
    if component in ("ar", "vq", "dit"):
        return dtype
    return torch.bfloat16 if component == "vae" and dtype == torch.bfloat16 else torch.float32


def caster(dtype: torch.dtype, component_of):
    """cast(name, tensor) for read_safetensors: floating tensors to their component's dtype as they are read."""
    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(component_dtype(component_of(name), dtype)) if t.is_floating_point() else t
    return cast


def build(cfg: ModelConfig, tokenizer: TextTokenizer, *, device: str = "auto", dtype: str = "float32",
          state: dict[str, dict[str, torch.Tensor]] | None = None, seed: int = 0) -> Pipeline:
    """Build a pipeline from a config; `state` (per component) loads weights, else random init from `seed`.
    state["vq"] may be a function returning the visual tokenizer's tensors: the ViT is then built the first time
    something needs it (an image to read), never for text-to-image; so may state["vae_encoder"] (the VAE encoder's
    tensors, state["vae"] then holding the rest of the VAE). state["deferred_names"] ({"vq": names,
    "vae_encoder": names}, from the files' headers) checks a deferred component's names now, at load.
    build() empties state's dicts as it loads them: the tensors become the modules' own, and a later conversion
    (channels-last VAE, dtype) frees the old copy at once instead of holding two (fp32 load peak at `small`
    1917 -> 1620 MiB with the 64 MiB windows)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if dt == torch.bfloat16 and not native_bf16(dev):
        log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 matmuls are emulated, many times slower "
                    "than float32 here; --dtype float32 is the fast choice on it")
    if len(tokenizer) > cfg.ar.vocab_size:
        raise ValueError(f"text tokenizer has {len(tokenizer)} ids but the AR embedding only {cfg.ar.vocab_size}")
    torch.manual_seed(seed)
    if state is None:
        ar, vq, dit = ARModel(cfg.ar), VisualTokenizer(cfg.vq), DiT(cfg.dit)
        dit.initialize_weights()
    else:
        with torch.device("meta"):
            ar, dit = ARModel(cfg.ar), DiT(cfg.dit)
            vq = None if callable(state["vq"]) else VisualTokenizer(cfg.vq)
            if vq is None and "vq" in state.get("deferred_names", {}):  # a bad file fails at load, not at an edit
                _check_names(VisualTokenizer(cfg.vq).state_dict(), state["deferred_names"]["vq"], "vq")
        for name, mod in (("ar", ar), ("vq", vq), ("dit", dit)):
            if mod is not None:
                _load_into(mod, state[name], name)
                state[name].clear()
    if state is None:
        glyph, vae = GlyphEncoder(cfg.glyph), VAE(cfg.vae)
    else:
        with torch.device("meta"):  # no random init that the checkpoint overwrites (peak memory = the weights)
            glyph, vae = GlyphEncoder(cfg.glyph), VAE(cfg.vae)
        if callable(state.get("vae_encoder")):  # read when an image is first encoded, never for text-to-image
            if "vae_encoder" in state.get("deferred_names", {}):
                _check_names(vae.model.encoder.state_dict(), state["deferred_names"]["vae_encoder"], "vae encoder")
            read = state["vae_encoder"]
            vae.defer_encoder(lambda encoder: _load_into(encoder, read(), "vae encoder"))
        _load_into(glyph.encoder, state["glyph"], "glyph")
        _load_into(vae.model, state["vae"], "vae")
        state["glyph"].clear()
        state["vae"].clear()
    for name, m in (("ar", ar), ("vq", vq), ("dit", dit), ("glyph", glyph), ("vae", vae)):
        if m is not None:
            m.to(dev, component_dtype(name, dt)).eval()
    vae.to(memory_format=torch.channels_last)  # the convolution kernels' preferred layout: 13 % faster decodes
    pipe = Pipeline(cfg, tokenizer=tokenizer, ar=ar, vq=vq, dit=dit, glyph=glyph, vae=vae, device=dev, dtype=dt)
    if vq is None:
        pipe.vq_factory = functools.partial(_build_vq, cfg.vq, state["vq"])
    return pipe


def _build_vq(cfg: VQConfig, read) -> VisualTokenizer:
    with torch.device("meta"):
        vq = VisualTokenizer(cfg)
    _load_into(vq, read(), "vq")
    return vq.eval()


def model_folder(name: str | Path) -> Path:
    """The folder a model name means: `world` is the embedded model unless a folder of that name is at hand."""
    return EMBEDDED if isinstance(name, str) and name == "world" and not Path(name).exists() else Path(name)


def load(path_or_preset: str | Path, *, device: str = "auto", dtype: str = "float32") -> Pipeline:
    """Load a pipeline: a preset name (random weights), our own folder, or an official diffusers-layout folder."""
    p = model_folder(path_or_preset)
    if p is EMBEDDED:
        if not (EMBEDDED / "config.json").is_file():
            raise ValueError(f"the embedded world model is missing from this install ({EMBEDDED}); "
                             "train it with `glmimage train all --preset world --ship <dir>` and pass --model <dir>")
        return load_own(EMBEDDED, device=device, dtype=dtype)
    if isinstance(path_or_preset, str) and not p.exists() and path_or_preset in ("debug", "glm-image"):
        cfg = preset(path_or_preset)
        return build(cfg, TextTokenizer.byte_level(cfg.vq.codebook_size), device=device, dtype=dtype)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{p}: pickle checkpoints are never loaded; give a glmimage or diffusers folder")
        raise ValueError(f"{p} is a file; give a model folder (glmimage format or official diffusers layout)")
    if not p.is_dir():
        raise ValueError(f"model not found: {path_or_preset!r}; give a folder, 'world' (the embedded model) or a "
                         "random-weight preset: debug, glm-image")
    if (p / "model_index.json").is_file():
        return load_official(p, device=device, dtype=dtype)
    if (p / "config.json").is_file():
        return load_own(p, device=device, dtype=dtype)
    raise ValueError(f"{p} holds neither config.json (glmimage format) nor model_index.json (diffusers layout)")


# ---------------------------------------------------------------------------------------------------------------
# Our own format
# ---------------------------------------------------------------------------------------------------------------
def save(pipe: Pipeline, path: str | Path, *, dtype: str | None = None) -> Path:
    """Write config.json, tokenizer.json and model.safetensors (all components, prefixed) atomically."""
    final = Path(path)
    dt = resolve_dtype(dtype) if dtype else None
    pipe.vae.materialize()  # a deferred encoder is read now: the folder written holds every weight
    with atomic_folder(final) as tmp:
        tensors = {}
        for name, mod in (("ar", pipe.ar), ("vq", pipe.vq), ("dit", pipe.dit), ("glyph", pipe.glyph.encoder),
                          ("vae", pipe.vae.model)):
            for k, v in mod.state_dict().items():
                if name == "glyph" and k == TIED_T5:
                    continue  # tied to shared.weight; restored on load
                v = v.detach().to("cpu")
                tensors[f"{name}.{k}"] = (v.to(dt) if dt is not None and v.is_floating_point() else v).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **pipe.cfg.to_dict()}, indent=2))
        pipe.tokenizer.save(tmp / "tokenizer.json")
    return final


def load_own(path: Path, *, device: str = "auto", dtype: str = "float32") -> Pipeline:
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if raw.pop("format", None) != FORMAT:
        raise ValueError(f"{path / 'config.json'} is not a {FORMAT} config")
    cfg = ModelConfig.from_dict(raw)
    pickles = [f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
    weights = path / "model.safetensors"
    if not weights.is_file() and pickles:
        raise ValueError(f"{pickles[0]}: pickle checkpoints are never loaded; expected {weights}")
    cast = caster(resolve_dtype(dtype), lambda k: k.partition(".")[0])
    deferred = ("vq.", "vae.encoder.")  # the ViT and the VAE encoder: read when an image needs them
    flat = read_safetensors([weights], keep=lambda k: not k.startswith(deferred), cast=cast)
    state: dict = {k: {} for k in ("ar", "dit", "glyph", "vae")}
    for k in list(flat):
        comp, _, rest = k.partition(".")
        if comp not in state:
            raise ValueError(f"{weights}: unexpected tensor {k}")
        state[comp][rest] = flat.pop(k)  # one reference: build() hands each tensor to its module
    names = _tensor_names([weights])
    state["deferred_names"] = {}
    for comp, prefix in (("vq", "vq."), ("vae_encoder", "vae.encoder.")):
        state[comp] = functools.partial(_read_prefixed, [weights], prefix, cast)
        state["deferred_names"][comp] = [k[len(prefix):] for k in names if k.startswith(prefix)]
    _tie_t5(state["glyph"])
    return build(cfg, TextTokenizer.from_file(path / "tokenizer.json"), device=device, dtype=dtype, state=state)


def _read_prefixed(files: list[Path], prefix: str, cast) -> dict[str, torch.Tensor]:
    """The tensors of `files` whose names start with `prefix`, named without it (a deferred component's reader)."""
    return {k[len(prefix):]: v for k, v in
            read_safetensors(files, keep=lambda k: k.startswith(prefix), cast=cast).items()}


# ---------------------------------------------------------------------------------------------------------------
# Official diffusers layout
# ---------------------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"missing file in the official layout: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """Sharded or single safetensors of one component; the index, when present, names every shard."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in _json(index)["weight_map"].values()})
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    pickles = [f for f in folder.glob("*") if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{pickles[0]}: pickle checkpoints are never loaded; convert to safetensors")
    raise ValueError(f"no safetensors weights in {folder}")


def official_config(root: Path) -> ModelConfig:
    """Read the official folder's JSON configs into a ModelConfig."""
    vle = _json(root / "vision_language_encoder" / "config.json")
    tc, vc, qc = vle["text_config"], vle["vision_config"], vle["vq_config"]
    rope = tc.get("rope_parameters") or {}
    dit = _json(root / "transformer" / "config.json")
    vae = {k: v for k, v in _json(root / "vae" / "config.json").items() if not k.startswith("_")}
    t5 = {k: v for k, v in _json(root / "text_encoder" / "config.json").items()
          if not k.startswith("_") and k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
    sched = _json(root / "scheduler" / "scheduler_config.json")
    proc = _json(root / "processor" / "processor_config.json").get("image_processor", {})
    gen_path = root / "vision_language_encoder" / "generation_config.json"
    gen = _json(gen_path) if gen_path.is_file() else {}
    size = proc.get("size") or {}
    return ModelConfig(
        ar=ARConfig(vocab_size=tc["vocab_size"], vision_vocab_size=tc["vision_vocab_size"], dim=tc["hidden_size"],
                    n_layers=tc["num_hidden_layers"], n_heads=tc["num_attention_heads"],
                    n_kv_heads=tc["num_key_value_heads"], intermediate_size=tc["intermediate_size"],
                    norm_eps=tc.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", 10000.0),
                    partial_rotary_factor=rope.get("partial_rotary_factor", 0.5),
                    mrope_section=tuple(rope.get("mrope_section", (8, 12, 12)))),
        vq=VQConfig(dim=vc["hidden_size"], n_layers=vc["depth"], n_heads=vc["num_heads"],
                    intermediate_size=vc["intermediate_size"], patch_size=vc["patch_size"],
                    pos_grid=vc["image_size"] // vc["patch_size"], norm_eps=vc.get("layer_norm_eps", 1e-6),
                    codebook_size=qc["num_embeddings"], code_dim=qc["embed_dim"],
                    min_pixels=size.get("shortest_edge", 512 * 512), max_pixels=size.get("longest_edge", 2048 * 2048),
                    image_mean=tuple(proc.get("image_mean", VQConfig().image_mean)),
                    image_std=tuple(proc.get("image_std", VQConfig().image_std))),
        dit=DiTConfig(in_channels=dit["in_channels"], patch_size=dit["patch_size"], n_layers=dit["num_layers"],
                      n_heads=dit["num_attention_heads"], head_dim=dit["attention_head_dim"],
                      glyph_dim=dit["text_embed_dim"], time_embed_dim=dit["time_embed_dim"],
                      condition_dim=dit["condition_dim"], codebook_size=dit["prior_vq_quantizer_codebook_size"]),
        glyph=t5, vae=vae,
        sampling=SamplingConfig(temperature=gen.get("temperature", 0.9), top_p=gen.get("top_p", 0.75),
                                top_k=gen.get("top_k", 50)),
        schedule=ScheduleConfig(num_train_timesteps=sched.get("num_train_timesteps", 1000),
                                base_image_seq_len=sched.get("base_image_seq_len", 256),
                                base_shift=sched.get("base_shift", 0.25), max_shift=sched.get("max_shift", 0.75)),
    )


def load_official(root: Path, *, device: str = "auto", dtype: str = "float32") -> Pipeline:
    """Load a GlmImagePipeline folder (model_index.json + subfolders) into our modules."""
    index = _json(root / "model_index.json")
    if index.get("_class_name") != "GlmImagePipeline":
        raise ValueError(f"{root}: model_index.json describes {index.get('_class_name')!r}, not GlmImagePipeline")
    cfg = official_config(root)
    dt = resolve_dtype(dtype)
    vle_files = _weight_files(root / "vision_language_encoder", "model")
    is_vq = lambda k: not k.startswith(IGNORED_OFFICIAL) and map_key(k, "ar") is None and map_key(k, "vq") is not None

    def read_vq() -> dict[str, torch.Tensor]:  # the ViT: read the first time an image needs it
        out = {}
        for k, v in read_safetensors(vle_files, keep=is_vq, cast=caster(dt, lambda k: "vq")).items():
            ours = map_key(k, "vq")
            out[ours] = v.flatten(1) if ours == "quant_proj.weight" else v  # 1×1 conv -> linear
        return out

    state: dict = {"ar": {}, "vq": read_vq}
    state["deferred_names"] = {"vq": [map_key(k, "vq") for k in _tensor_names(vle_files) if is_vq(k)]}
    unknown = []
    for k, v in read_safetensors(vle_files, keep=lambda k: not is_vq(k), cast=caster(dt, lambda k: "ar")).items():
        if k.startswith(IGNORED_OFFICIAL):
            continue
        ours = map_key(k, "ar")
        if ours is None:
            unknown.append(k)
        else:
            state["ar"][ours] = v
    state["dit"] = {}
    for k, v in read_safetensors(_weight_files(root / "transformer", "diffusion_pytorch_model"),
                                 cast=caster(dt, lambda k: "dit")).items():
        ours = map_key(k, "dit")
        if ours is None:
            unknown.append(k)
        else:
            state["dit"][ours] = v
    if unknown:
        raise ValueError(f"{root}: tensors with no counterpart in glmimage: {unknown[:5]}")
    state["glyph"] = read_safetensors(_weight_files(root / "text_encoder", "model"), cast=caster(dt, lambda k: "glyph"))
    _tie_t5(state["glyph"])
    vae_files, vae_cast = _weight_files(root / "vae", "diffusion_pytorch_model"), caster(dt, lambda k: "vae")
    state["vae"] = read_safetensors(vae_files, keep=lambda k: not k.startswith("encoder."), cast=vae_cast)
    state["vae_encoder"] = functools.partial(_read_prefixed, vae_files, "encoder.", vae_cast)  # first encoded
    state["deferred_names"]["vae_encoder"] = [k[8:] for k in _tensor_names(vae_files) if k.startswith("encoder.")]
    tok = TextTokenizer.from_file(root / "processor" / "tokenizer.json")
    return build(cfg, tok, device=device, dtype=dtype, state=state)


def export_official(pipe: Pipeline, path: str | Path) -> Path:
    """Write the official diffusers layout so that `GlmImagePipeline.from_pretrained(path)` loads these weights.

    Builds the reference classes (transformers + diffusers) on the meta device, assigns our tensors under the
    official names and lets the libraries write their own configs.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (ByT5Tokenizer, GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor,
                              PreTrainedTokenizerFast)
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    from glmimage.tokenizer.text import GRID_BOS, GRID_EOS, IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START, PAD

    cfg, tok = pipe.cfg, pipe.tokenizer
    pipe.vae.materialize()  # a deferred encoder is read: the export holds every weight
    if cfg.vq.downsample != 2 or cfg.stride != 32 or cfg.preview_side != 16:
        raise ValueError("the official layout hard-codes a 32-px token stride, a halved tokenizer input and a 16-side "
                         f"preview grid; this model has stride {cfg.stride}, downsample {cfg.vq.downsample}, "
                         f"preview {cfg.preview_side}")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token=IMAGE_START, eos_token=IMAGE_END,
                                     pad_token=PAD, image_token=IMAGE_PLACEHOLDER, grid_bos_token=GRID_BOS,
                                     grid_eos_token=GRID_EOS, padding_side="left")
    template = ("{%- for m in messages -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}"
                "{%- for item in m.content -%}{%- if item.type == 'image' -%}" + IMAGE_START + IMAGE_PLACEHOLDER
                + IMAGE_END + "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}"
                "{%- endif -%}{%- endfor -%}")
    hf_tok.chat_template = template
    image_processor = GlmImageImageProcessorPil(
        patch_size=cfg.vq.patch_size, temporal_patch_size=1, merge_size=1, image_mean=list(cfg.vq.image_mean),
        image_std=list(cfg.vq.image_std), size={"shortest_edge": cfg.vq.min_pixels, "longest_edge": cfg.vq.max_pixels})
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=template)
    a, v = cfg.ar, cfg.vq
    hf_cfg = GlmImageConfig(
        text_config=dict(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         rms_norm_eps=a.norm_eps, vision_vocab_size=a.vision_vocab_size, pad_token_id=tok.pad_id,
                         eos_token_id=tok.image_end_id,
                         rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta,
                                          "partial_rotary_factor": a.partial_rotary_factor,
                                          "mrope_section": list(a.mrope_section)}),
        vision_config=dict(depth=v.n_layers, hidden_size=v.dim, num_heads=v.n_heads,
                           intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                           image_size=v.pos_grid * v.patch_size, spatial_merge_size=1, layer_norm_eps=v.norm_eps),
        vq_config=dict(embed_dim=v.code_dim, num_embeddings=v.codebook_size, latent_channels=v.dim),
        image_token_id=tok.image_placeholder_id, image_start_token_id=tok.image_start_id,
        image_end_token_id=tok.image_end_id)
    d = cfg.dit
    with torch.device("meta"):
        vle = GlmImageForConditionalGeneration(hf_cfg)
        dit = GlmImageTransformer2DModel(
            patch_size=d.patch_size, in_channels=d.in_channels, out_channels=d.in_channels, num_layers=d.n_layers,
            attention_head_dim=d.head_dim, num_attention_heads=d.n_heads, text_embed_dim=d.glyph_dim,
            time_embed_dim=d.time_embed_dim, condition_dim=d.condition_dim,
            prior_vq_quantizer_codebook_size=d.codebook_size)
    state = {}
    for comp, mod in (("ar", pipe.ar), ("vq", pipe.vq)):
        for k, t in mod.state_dict().items():
            t = t.detach().cpu().float()
            state[map_key(k, comp, to_official=True)] = t[:, :, None, None] if k == "quant_proj.weight" else t
    state["model.vqmodel.post_quant_conv.weight"] = torch.zeros(v.dim, v.code_dim, 1, 1)  # unused by design
    state["model.vqmodel.post_quant_conv.bias"] = torch.zeros(v.dim)
    vle.load_state_dict(state, strict=True, assign=True)
    vle.eval()
    gc = vle.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, cfg.sampling.temperature, cfg.sampling.top_p
    if cfg.sampling.top_k is not None:
        gc.top_k = cfg.sampling.top_k
    gc.pad_token_id, gc.eos_token_id = tok.pad_id, tok.image_end_id
    dit.load_state_dict({map_key(k, "dit", to_official=True): t.detach().cpu().float()
                         for k, t in pipe.dit.state_dict().items()}, strict=True, assign=True)
    s = cfg.schedule
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=s.num_train_timesteps, use_dynamic_shifting=True, base_shift=s.base_shift,
        max_shift=s.max_shift, base_image_seq_len=s.base_image_seq_len, max_image_seq_len=4096,
        time_shift_type="linear")
    ref = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=processor, text_encoder=pipe.glyph.encoder,
                           vision_language_encoder=vle, vae=pipe.vae.model, transformer=dit.eval(), scheduler=scheduler)
    final = Path(path)
    with atomic_folder(final) as tmp:
        ref.save_pretrained(tmp)
    return final
