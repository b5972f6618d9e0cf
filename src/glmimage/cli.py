"""Command line: `glmimage generate | edit | convert`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "debug"  # until the embedded world model ships


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
                   help="model folder (glmimage format or official diffusers layout) or preset: debug, glm-image")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT in pixels, multiples of the model's "
                   "token stride (32 px for GLM-Image); default: the model's own size")
    p.add_argument("--steps", type=int, default=None, help="DiT denoising steps (default: model's, 50 for GLM-Image)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (GLM-Image: 1.5); "
                   "<= 1 disables guidance")
    p.add_argument("--seed", type=int, default=0, help="random seed for AR sampling and the initial noise")
    p.add_argument("--temperature", type=float, default=None, help="AR sampling temperature (GLM-Image: 0.9)")
    p.add_argument("--top-p", type=float, default=None, help="AR nucleus sampling threshold (GLM-Image: 0.75)")
    p.add_argument("--top-k", type=int, default=None, help="AR top-k sampling (GLM-Image reference: 50)")
    p.add_argument("--greedy", action="store_true", help="greedy AR decoding (deterministic, usually flatter images)")
    p.add_argument("--n", type=int, default=1, help="images to generate (one batch)")
    p.add_argument("--device", default="auto", help="cpu, cuda, npu, mps or auto (default)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 for the AR and DiT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run(args: argparse.Namespace, images: list[str] | None) -> None:
    import glmimage

    pipe = glmimage.load(args.model, device=args.device, dtype=args.dtype)
    width, height = args.size if args.size else (None, None)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    result = pipe([args.prompt] * args.n, images=images, height=height, width=width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, greedy=args.greedy, progress=not args.quiet)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(args.n)]
    for img, path in zip(result.images, paths):
        img.save(path)
    t = result.timings
    print(f"wrote {', '.join(map(str, paths))}  ({result.images[0].width}x{result.images[0].height})")
    print(f"timings: ar {t['ar']:.2f}s  dit {t['dit']:.2f}s  vae {t['vae']:.2f}s  total {t['total']:.2f}s")


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
    except ValueError as err:
        print(f"glmimage: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
