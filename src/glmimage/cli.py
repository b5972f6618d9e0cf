"""Command line: `glmimage generate | edit | convert | train | eval | bench | serve`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The embedded world model (glmimage/assets/world, fp16, trained on the synthetic world; README "The embedded world
# model") is every command's default; `--model debug` is the tiny random-weight preset.
DEFAULT_MODEL = "world"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 1024x768), got {text!r}") from None
    return w, h


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw; text to render goes in quotes, e.g. a sign that says 'OPEN'")
    p.add_argument("-o", "--output", default="out.png", help="output PNG path; with --n > 1, _0, _1, ... are added")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder (glmimage format or official diffusers layout), 'world' (the embedded model, "
                   "default) or a random-weight preset: debug, glm-image")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT in pixels, multiples of the model's "
                   "token stride (32 px for GLM-Image); default: the model's own size")
    p.add_argument("--steps", type=int, default=None, help="DiT denoising steps (default: model's, 50 for GLM-Image)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (GLM-Image: 1.5); "
                   "<= 1 disables guidance")
    p.add_argument("--ar-guidance", type=float, default=None, help="classifier-free guidance of the AR's logits "
                   "against the caption left out (default: the model's; 1 = none, as GLM-Image)")
    p.add_argument("--seed", type=int, default=0, help="random seed for AR sampling and the initial noise")
    p.add_argument("--temperature", type=float, default=None, help="AR sampling temperature (GLM-Image: 0.9)")
    p.add_argument("--top-p", type=float, default=None, help="AR nucleus sampling threshold (GLM-Image: 0.75)")
    p.add_argument("--top-k", type=int, default=None, help="AR top-k sampling (GLM-Image reference: 50)")
    p.add_argument("--greedy", action="store_true", help="greedy AR decoding (deterministic, usually flatter images)")
    p.add_argument("--n", type=int, default=1, help="images to generate (one batch)")
    _engine(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, npu, mps or auto (default)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 for the AR and DiT")
    p.add_argument("--ar-device", default=None, help="device of the AR stage (AR + visual tokenizer); default --device")
    p.add_argument("--dit-device", default=None, help="device of the DiT stage (DiT + glyph encoder + VAE); "
                   "default --device")
    p.add_argument("--offload", action="store_true", help="keep idle stages in CPU memory; each stage moves to its "
                   "device only while it runs (less device memory, some transfer time)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="weight-only int8 for the linear layers of the AR and the DiT")
    p.add_argument("--compile", action="store_true", help="torch.compile the AR decode step (falls back to eager "
                   "with one log line where compilation fails)")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER[:SCALE]",
                   help="merge a LoRA adapter (from `glmimage finetune`) into the weights, scaled (default 1); repeat "
                   "for several")


def load_engine(model: str, args: argparse.Namespace):
    """Load a model and apply the engine options of `_engine` (quantize on the CPU, then place, then compile)."""
    import glmimage
    from glmimage.pipeline import resolve_device

    dev = resolve_device(args.device)
    split = args.offload or args.ar_device or args.dit_device or args.quantize != "none"
    pipe = glmimage.load(model, device="cpu" if split else dev, dtype=args.dtype)
    if args.lora:
        from glmimage import lora

        for line in lora.apply(pipe, args.lora):
            print(line, file=sys.stderr)
    pipe.quantize(args.quantize)
    if split:
        pipe.place(ar_device=args.ar_device or dev, dit_device=args.dit_device or dev, offload=args.offload)
    if args.compile:
        pipe.compile()
    return pipe


def _run(args: argparse.Namespace, images: list[str] | None) -> None:
    pipe = load_engine(args.model, args)
    width, height = args.size if args.size else (None, None)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    result = pipe([args.prompt] * args.n, images=images, height=height, width=width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, greedy=args.greedy, ar_guidance_scale=args.ar_guidance,
                  progress=not args.quiet)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(args.n)]
    for img, path in zip(result.images, paths):
        img.save(path)
    t = result.timings
    print(f"wrote {', '.join(map(str, paths))}  ({result.images[0].width}x{result.images[0].height})")
    print(f"timings: ar {t['ar']:.2f}s  dit {t['dit']:.2f}s  vae {t['vae']:.2f}s  total {t['total']:.2f}s")
    print("peak memory: " + "  ".join(f"{k} {v:.0f} MiB" for k, v in result.peak_memory.items()))


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _train(args: argparse.Namespace) -> None:
    from glmimage import train

    overrides = {"out": args.out, **_parse_set(args.set)}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.threads:
        overrides["threads"] = args.threads
    recipe = "quick" if args.quick else "world"
    if args.stage == "assemble":
        from glmimage.train.assemble import assemble

        print(f"wrote {assemble(args.out, dest=args.ship, live=args.live, base=args.base)}")
        return
    if args.stage == "all":
        path = train.run("all", recipe, **overrides)
    else:
        path = train.run(args.stage, recipe, **train.for_stage(args.stage, overrides))
    if args.ship:
        from glmimage.train.assemble import assemble

        path = assemble(args.out, dest=args.ship)
    print(f"wrote {path}")


def _finetune(args: argparse.Namespace) -> None:
    from glmimage import finetune

    kw = {k: v for k, v in vars(args).items() if k in FINETUNE_FLAGS and v is not None}
    cfg = finetune.FinetuneConfig().with_overrides(**kw, **_parse_set(args.set))
    finetune.main(cfg)


FINETUNE_FLAGS = ("model", "data", "out", "cache", "target", "method", "rank", "alpha", "resolution", "steps",
                  "batch_size", "lr", "grad_accum", "grad_checkpointing", "ema", "parallel", "device", "threads",
                  "sample_every", "ckpt_every", "bf16", "seed")


def _finetune_parser(sub) -> None:
    f = sub.add_parser("finetune", help="LoRA or full fine-tuning on captioned images (torchrun for several "
                       "processes)", description="Fine-tune the AR model, the DiT or both on an image folder "
                       "(captions in .txt beside each image), a .jsonl manifest or webdataset .tar shards. Images are "
                       "pretokenized once into <out>/cache. Writes <out>/adapter.safetensors (LoRA) or <out>/model "
                       "(full), samples.png (data | base | fine-tuned), loss.png, tb/; resumes from <out>/ckpt. "
                       "Several processes: torchrun --nproc_per_node N -m glmimage finetune ...")
    f.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or preset")
    f.add_argument("--data", required=True, help="image folder, .jsonl manifest, .tar shard or folder of shards")
    f.add_argument("--out", default="runs/finetune", help="run folder (default runs/finetune)")
    f.add_argument("--cache", default=None, help="pretokenized items (default <out>/cache; share it between runs)")
    f.add_argument("--target", default="dit", choices=["ar", "dit", "both"], help="what trains (default dit)")
    f.add_argument("--method", default="lora", choices=["lora", "full"], help="LoRA adapters or all weights")
    f.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16)")
    f.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    f.add_argument("--resolution", type=int, default=None, help="bucket area = RESOLUTION² px (default: the "
                   "model's image size)")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (default 500)")
    f.add_argument("--batch-size", type=int, default=None, help="global batch size (default 8)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    f.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1)")
    f.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward (less memory)")
    f.add_argument("--ema", type=float, default=None, help="EMA decay of the trained weights, e.g. 0.999 (default "
                   "none); the EMA is what gets saved")
    f.add_argument("--parallel", default=None, choices=["auto", "none", "ddp", "fsdp"],
                   help="under torchrun: ddp (default) or fsdp (FSDP2, sharded)")
    f.add_argument("--device", default=None, help="cpu (default), cuda or npu")
    f.add_argument("--threads", type=int, default=None, help="torch threads per process")
    f.add_argument("--sample-every", type=int, default=None, help="steps between sample grids (default 100)")
    f.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default 50)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmimage", description="GLM-Image-style generation: an AR model writes "
                                     "semantic image tokens, a DiT paints the pixels, a glyph encoder renders text.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image", description="Generate an image from a prompt.")
    _common(g)
    e = sub.add_parser("edit", help="image(s) + instruction to image",
                       description="Edit or combine condition images following an instruction.")
    e.add_argument("--image", action="append", required=True, help="condition image; repeat for several")
    _common(e)
    c = sub.add_parser("convert", help="convert between the official diffusers layout and the glmimage format",
                       description="Load a model (either format or a preset) and write it in the other format.")
    c.add_argument("src", help="model folder or preset")
    c.add_argument("dst", help="output folder")
    c.add_argument("--to", choices=["glmimage", "official"], default="glmimage", help="output format")
    c.add_argument("--dtype", default=None, help="store weights in this dtype (glmimage format only)")
    t = sub.add_parser("train", help="train a stage of the world model (or all of them)",
                       description="Train one stage (data, vae, tokenizer, ar, dit) or all of them in order; every "
                       "stage resumes from <out>/<stage>/ckpt when it is there.")
    t.add_argument("stage", choices=["data", "vae", "tokenizer", "ar", "dit", "all", "assemble"],
                   help="a stage, all of them, or assemble (put the stage outputs together into a model folder)")
    t.add_argument("--preset", default="world", choices=["world"], help="model geometry and recipe")
    t.add_argument("--quick", action="store_true", help="a few steps per stage on a tiny dataset (smoke test)")
    t.add_argument("--out", default="runs/world", help="run folder (default runs/world)")
    t.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field of the stage config, e.g. --set lr=3e-4 --set batch_size=32")
    t.add_argument("--ship", default=None, metavar="DIR", help="after `all`: also write the fp16 model folder here")
    t.add_argument("--live", action="store_true", help="assemble: take each stage's newest checkpoint (EMA) instead "
                   "of its final weights (a snapshot of a run in progress)")
    t.add_argument("--base", default=None, metavar="MODEL", help="assemble: take the components the run has not "
                   "trained from this model folder (`world`: the embedded model)")
    ev = sub.add_parser("eval", help="judge a model on the world's held-out prompts and edits",
                        description="Generate held-out world prompts and edit pairs and score them with the OCR and "
                        "OpenCV judges; prints a table and writes <out>/world_eval.json.")
    ev.add_argument("suite", choices=["world"])
    ev.add_argument("--model", default="world", help="model folder or 'world' (the embedded model, default)")
    ev.add_argument("--n", type=int, default=40, help="held-out prompts per scene kind (5 kinds)")
    ev.add_argument("--edits", type=int, default=100, help="held-out edit pairs")
    ev.add_argument("--steps", type=int, default=None, help="DiT steps (default: the model's)")
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--temperature", type=float, default=None)
    ev.add_argument("--ar-guidance", type=float, default=None, help="AR classifier-free guidance (default: model's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--true-ids", action="store_true", help="judge the DiT alone: paint each scene's true semantic "
                    "ids (from its scene graph) instead of the AR's; the gap to a plain run is what the AR loses")
    ev.add_argument("--out", default="runs/eval", help="folder for world_eval.json and the sample sheets")
    bn = sub.add_parser("bench", help="glmimage vs the reference GlmImagePipeline on the same random weights",
                        description="Time glmimage and the reference pipeline (transformers + diffusers) side by side "
                        "on the same random weights, each variant in its own process; reports AR tokens/s, DiT "
                        "s/step, VAE s, end to end, peak memory, ratios and the fraction of the roofline reached.")
    bn.add_argument("model_size", nargs="?", default="small", choices=["debug", "small", "glm-image"],
                    help="debug (seconds), small (about 100 M parameters per component; default) or glm-image "
                    "(official size; GPU only)")
    bn.add_argument("--size", type=_size, default=(256, 256), help="WIDTHxHEIGHT (default 256x256)")
    bn.add_argument("--steps", type=int, default=8, help="DiT steps of the timed generation (default 8)")
    bn.add_argument("--variants", default=None, help="comma-separated ENGINE:DTYPE[+int8], ENGINE ours or ref "
                    "(default: ref and ours in float32 and bfloat16, ours also with int8 weights)")
    bn.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bn.add_argument("--compile", action="store_true", help="compile glmimage's AR decode step")
    bn.add_argument("--out", default="runs/bench", help="folder for bench.json")
    sv = sub.add_parser("serve", help="OpenAI-compatible Images API and web playground",
                        description="Serve /v1/images/generations, /v1/images/edits, /v1/models, /health and a web "
                        "playground at / (FastAPI + uvicorn; install glmimage[serve]).")
    sv.add_argument("--model", default=DEFAULT_MODEL, help="model folder or preset (default: the default model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    sv.add_argument("--allow-unauthenticated-remote", action="store_true",
                    help="bind a non-loopback address without an API key (anyone who reaches it can use the model)")
    sv.add_argument("--max-queue", type=int, default=16, help="waiting requests before 429 (default 16)")
    sv.add_argument("--max-batch", type=int, default=4, help="images generated together (default 4)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per request before 504 (default 300)")
    _engine(sv)
    _finetune_parser(sub)
    mg = sub.add_parser("merge", help="merge LoRA adapters into a model and save it",
                        description="Load a model, merge one or more LoRA adapters (scaled) into its weights and "
                        "write it in the glmimage format or the official diffusers layout.")
    mg.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or preset")
    mg.add_argument("--lora", action="append", required=True, metavar="ADAPTER[:SCALE]", help="adapter; repeatable")
    mg.add_argument("--out", required=True, help="output folder")
    mg.add_argument("--to", choices=["glmimage", "official"], default="glmimage", help="output format")
    mg.add_argument("--dtype", default=None, help="store weights in this dtype (glmimage format only)")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            _run(args, None)
        elif args.command == "edit":
            _run(args, args.image)
        elif args.command == "convert":
            import glmimage

            pipe = glmimage.load(args.src, device="cpu")
            path = glmimage.save(pipe, args.dst, dtype=args.dtype) if args.to == "glmimage" else \
                glmimage.export_official(pipe, args.dst)
            print(f"wrote {path}")
        elif args.command == "train":
            _train(args)
        elif args.command == "finetune":
            _finetune(args)
        elif args.command == "merge":
            import glmimage
            from glmimage import lora

            pipe = glmimage.load(args.model, device="cpu")
            for line in lora.apply(pipe, args.lora):
                print(line)
            path = glmimage.save(pipe, args.out, dtype=args.dtype) if args.to == "glmimage" else \
                glmimage.export_official(pipe, args.out)
            print(f"wrote {path}")
        elif args.command == "serve":
            from glmimage.serve import serve

            if not 0 < args.port < 65536 or args.max_queue < 1 or args.max_batch < 1 or args.timeout <= 0:
                raise ValueError("--port must be 1..65535, --max-queue and --max-batch >= 1, --timeout > 0")
            from glmimage.serve.app import check_bind

            check_bind(args.host, args.api_key, args.allow_unauthenticated_remote)  # before loading the model
            pipe = load_engine(args.model, args)
            serve(pipe, host=args.host, port=args.port, api_key=args.api_key,
                  allow_unauthenticated_remote=args.allow_unauthenticated_remote, model_name=Path(args.model).name,
                  max_queue=args.max_queue, max_batch=args.max_batch, timeout=args.timeout)
        elif args.command == "bench":
            from glmimage import bench

            variants = [bench.Variant.parse(v) for v in (args.variants or bench.DEFAULT_VARIANTS).split(",") if v]
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            report = bench.run(args.model_size, variants=variants, width=args.size[0], height=args.size[1],
                               steps=args.steps, device=args.device, compile=args.compile, out=args.out)
            print(bench.format_table(report))
            print(f"wrote {Path(args.out) / 'bench.json'}")
        elif args.command == "eval":
            import glmimage
            from glmimage.eval.world import EvalConfig, evaluate, format_table

            if args.n < 0 or args.edits < 0 or args.n + args.edits == 0:
                raise ValueError("--n and --edits must be >= 0 and not both 0")
            pipe = glmimage.load(args.model, device="cpu")
            report = evaluate(pipe, EvalConfig(n_per_kind=args.n, n_edits=args.edits, seed=args.seed,
                                               steps=args.steps, guidance=args.guidance,
                                               temperature=args.temperature, true_ids=args.true_ids,
                                               ar_guidance=args.ar_guidance,
                                               out=args.out))
            print(format_table(report))
            print(f"wrote {Path(args.out) / 'world_eval.json'}")
    except ValueError as err:
        print(f"glmimage: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
