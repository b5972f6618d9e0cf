"""OpenAI-compatible Images API (FastAPI): /v1/images/generations, /v1/images/edits, /v1/models, /health, and the
web playground at /. Every input is validated here; nothing a client sends reads or writes a file on the server."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import secrets
import time
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmimage.serve.engine import Engine, Job, QueueFull

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ImageParams(BaseModel):
    """The fields of both endpoints: OpenAI's names, then the engine's extensions as top-level fields."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw; text to render goes in quotes")
    model: str | None = Field(None, description="ignored: this server serves one model (see GET /v1/models)")
    n: int = Field(1, ge=1, le=10, description="number of images")
    size: str = Field("auto", description="WIDTHxHEIGHT in pixels, multiples of the model's token stride, or auto")
    response_format: Literal["b64_json", "url"] | None = Field("b64_json", description="only b64_json is served")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality")
    quality: str | None = Field(None, description="accepted for compatibility; use num_inference_steps")
    background: Literal["auto", "opaque"] | None = None
    style: str | None = None
    moderation: str | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool | None = Field(None, description="not supported: must be false or absent")
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="DiT denoising steps")
    guidance_scale: float | None = Field(None, ge=0, le=30, description="classifier-free guidance scale")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seed of the first image; image i uses seed + i")
    negative_prompt: str | None = Field(None, max_length=4000, description="glyph text of the unconditional branch")
    temperature: float | None = Field(None, gt=0, le=5, description="AR sampling temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="AR nucleus sampling threshold")


class EditParams(ImageParams):
    input_fidelity: Literal["high", "low"] | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    timings: dict[str, float] = Field(description="seconds: queue, ar, dit, vae, total; batch_rows")


class Limits(BaseModel):
    max_prompt_chars: int = 4000
    max_images: int = 4
    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_json_bytes: int = 2**20  # bodies of every endpoint but the edits
    timeout: float = 300.0

    @property
    def max_edit_bytes(self) -> int:
        """An edit body: its files (base64 in JSON is 4/3 larger) and a margin for the fields."""
        return (self.max_images + 1) * self.max_upload_bytes * 4 // 3 + 2**20


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over a per-path byte limit, declared (Content-Length) or streamed (chunked),
    before anything is parsed, buffered or spooled."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_edit_bytes if scope["path"] == "/v1/images/edits" else self.limits.max_json_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse(error_body(f"request body larger than {limit} bytes"), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"request body larger than {limit} bytes")
            return message

        return await self.app(scope, limited, send)


def create_app(pipe, *, model_name: str = "glmimage", api_key: str | None = None, max_queue: int = 16,
               max_batch: int = 4, limits: Limits | None = None) -> FastAPI:
    """The API around one pipeline; its engine thread starts here and stops when the app shuts down."""
    limits = limits or Limits()
    engine = Engine(pipe, max_queue=max_queue, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="glmimage", version="0.1.0", summary="OpenAI-compatible Images API for GLM-Image-style "
                  "models", lifespan=lifespan)
    app.add_middleware(BodyLimit, limits=limits)
    app.state.engine = engine
    created = int(time.time())
    stride = pipe.cfg.stride
    max_pixels = pipe.cfg.vq.max_pixels

    # ---------------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        type_ = {401: "authentication_error", 429: "rate_limit_error", 504: "timeout"}.get(e.status,
                                                                                      "invalid_request_error")
        if e.status >= 500 and e.status != 504:
            type_ = "server_error"
        return JSONResponse(error_body(e.message, type_=type_, param=e.param, code=e.code), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(_explain(e.errors()), param=_param(e.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if isinstance(e.__cause__, BodyTooLarge):  # FastAPI reports a failed body read as a parse error
            return JSONResponse(error_body(str(e.__cause__)), status_code=413)
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge):
        return JSONResponse(error_body(str(e)), status_code=413)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", type_="server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def check(params: ImageParams, default: tuple[int, int]) -> tuple[int, int]:
        if len(params.prompt) > limits.max_prompt_chars:
            raise APIError(400, f"prompt is {len(params.prompt)} characters; at most {limits.max_prompt_chars}",
                           param="prompt")
        if not params.prompt.strip():
            raise APIError(400, "prompt must not be blank", param="prompt")
        if params.response_format == "url":
            raise APIError(400, "response_format 'url' is not served (this server stores no files); use b64_json",
                           param="response_format")
        if params.stream:
            raise APIError(400, "stream is not supported", param="stream")
        return parse_size(params.size, default)

    def parse_size(size: str, default: tuple[int, int]) -> tuple[int, int]:
        if size == "auto":
            return default
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise APIError(400, f"size must be 'auto' or WIDTHxHEIGHT, got {size!r}", param="size") from None
        if w < stride or h < stride or w % stride or h % stride:
            raise APIError(400, f"size {w}x{h}: width and height must be positive multiples of {stride}",
                           param="size")
        if w * h > max_pixels or max(w, h) > 4 * min(w, h):
            raise APIError(400, f"size {w}x{h}: at most {max_pixels} pixels and an aspect ratio of 4:1",
                           param="size")
        return w, h

    async def run(request: Request, params: ImageParams, size: tuple[int, int], images: list) -> dict:
        w, h = size
        first = params.seed if params.seed is not None else secrets.randbelow(2**31 - params.n)
        engine_params = {"height": h, "width": w, "num_inference_steps": params.num_inference_steps,
                         "guidance_scale": params.guidance_scale, "temperature": params.temperature,
                         "top_p": params.top_p, "negative_prompt": params.negative_prompt}
        job = Job(prompt=params.prompt, seeds=[first + i for i in range(params.n)], params=engine_params,
                  images=images)
        try:
            fut = engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "2"}) from None
        waiter = asyncio.wrap_future(fut)
        deadline = time.monotonic() + limits.timeout
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.2)
            if done:
                break
            if await request.is_disconnected():
                engine.cancel(job)  # frees its queue slot (a started batch finishes; its result is dropped)
                raise APIError(499, "client disconnected")
            if time.monotonic() > deadline:
                engine.cancel(job)
                raise APIError(504, f"the request did not finish within {limits.timeout:.0f} s")
        try:
            out, timings = waiter.result()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001  logged by the engine; the client gets a 500, the server goes on
            raise APIError(500, f"generation failed ({type(e).__name__})") from None
        return {"images": out, "timings": timings}

    def respond(params: ImageParams, result: dict, size: tuple[int, int]) -> dict:
        data = [{"b64_json": encode(im, params.output_format, params.output_compression),
                 "revised_prompt": params.prompt} for im in result["images"]]
        return {"created": int(time.time()), "data": data, "output_format": params.output_format,
                "size": f"{size[0]}x{size[1]}", "timings": result["timings"]}

    # ---------------------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", response_model=ImagesResponse, summary="Create images from a prompt",
              dependencies=[Depends(authorize)])
    async def generations(request: Request, params: ImageParams) -> dict:
        sc = pipe.cfg.sampling
        size = check(params, (sc.width, sc.height))
        result = await run(request, params, size, [])
        return await asyncio.to_thread(respond, params, result, size)

    edit_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"1 to {limits.max_images} PNG/JPEG/WEBP condition images (also 'image[]')"},
            "mask": {"type": "string", "format": "binary", "description": "PNG, same size as the first image; "
                     "alpha 0 marks where the result replaces the first image"},
            **{k: _form_schema(v) for k, v in EditParams.model_json_schema()["properties"].items()}}}}}}}

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=edit_schema,
              summary="Edit or combine images following a prompt (multipart/form-data)",
              dependencies=[Depends(authorize)])
    async def edits(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            fields, raw_images, raw_mask = await json_edit(request)
        elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            fields, raw_images, raw_mask = await form_edit(request)
        else:
            raise APIError(400, "send multipart/form-data with image file(s) and a prompt (or JSON with 'images' "
                           "as base64 data URLs)")
        if not raw_images:
            raise APIError(400, "no image: send one or more files in the 'image' field", param="image")
        if len(raw_images) > limits.max_images:
            raise APIError(400, f"{len(raw_images)} images; at most {limits.max_images}", param="image")
        try:
            params = EditParams(**fields)
        except ValidationError as e:
            raise APIError(400, _explain(e.errors()), param=_param(e.errors())) from None
        images = [await asyncio.to_thread(read_image, raw, "image", mode="RGB") for raw in raw_images]
        alpha = None
        if raw_mask is not None:
            m = await asyncio.to_thread(read_image, raw_mask, "mask", mode="RGBA")
            if "A" not in m.getbands() or m.getextrema()[3] == (255, 255):
                raise APIError(400, "mask has no transparent pixels: its alpha channel marks the area to edit "
                               "(alpha 0)", param="mask")
            if m.size != images[0].size:
                raise APIError(400, f"mask is {m.width}x{m.height} but the first image is "
                               f"{images[0].width}x{images[0].height}", param="mask")
            alpha = m.getchannel("A")
        size = check(params, snap(images[0].size))
        # the model reads condition images at most at its own size: keep no more while queued
        images = [shrink(im) for im in images]
        result = await run(request, params, size, images)
        if alpha is not None:  # OpenAI's convention: transparent mask pixels are the area to edit
            result["images"] = await asyncio.to_thread(composite, result["images"], images[0], alpha, size)
        return await asyncio.to_thread(respond, params, result, size)

    def shrink(im: Image.Image) -> Image.Image:
        if im.width * im.height <= max_pixels:
            return im
        scale = (max_pixels / (im.width * im.height)) ** 0.5
        return im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.LANCZOS)

    async def form_edit(request: Request) -> tuple[dict, list[bytes], bytes | None]:
        try:
            form = await request.form(max_files=limits.max_images + 1, max_fields=40,
                                      max_part_size=limits.max_upload_bytes)
        except BodyTooLarge as e:
            raise APIError(413, str(e)) from None
        except Exception as e:  # noqa: BLE001  python-multipart / starlette raise several types for bad bodies
            raise APIError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
        files = [v for k in ("image", "image[]") for v in form.getlist(k)]
        if any(isinstance(f, str) for f in files):
            raise APIError(400, "'image' must be file uploads", param="image")
        mask = form.get("mask")
        if isinstance(mask, str):
            raise APIError(400, "'mask' must be a file upload", param="mask")
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask") and isinstance(v, str)}
        return fields, [await f.read() for f in files], None if mask is None else await mask.read()

    async def json_edit(request: Request) -> tuple[dict, list[bytes], bytes | None]:
        """The JSON form of an edit: images (and mask) as base64 data URLs, {"image_url": url} or the bare string.
        Remote URLs are refused: nothing a client sends makes the server fetch or read anything."""
        try:
            body = await request.json()
        except BodyTooLarge as e:
            raise APIError(413, str(e)) from None
        except ValueError:
            raise APIError(400, "malformed JSON body") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        refs = body.pop("images", None) or []
        if not isinstance(refs, list):
            raise APIError(400, "'images' must be a list of data URLs", param="images")
        mask = body.pop("mask", None)
        return body, [data_url(r, "images") for r in refs], None if mask is None else data_url(mask, "mask")

    def data_url(ref, field: str) -> bytes:
        url = ref.get("image_url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
            raise APIError(400, f"{field}: give images as base64 data URLs (data:image/png;base64,...); remote URLs "
                           "and file ids are not fetched", param=field)
        try:
            raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        except (ValueError, binascii.Error):
            raise APIError(400, f"{field}: broken base64", param=field) from None
        return raw

    def read_image(raw: bytes, field: str, *, mode: str) -> Image.Image:
        if len(raw) > limits.max_upload_bytes:
            raise APIError(400, f"{field}: file larger than {limits.max_upload_bytes} bytes", param=field)
        try:
            im = Image.open(io.BytesIO(raw))
            if im.format not in UPLOAD_FORMATS:
                raise APIError(400, f"{field}: {im.format} images are not accepted; send PNG, JPEG or WEBP",
                               param=field)
            if im.width * im.height > limits.max_image_pixels:
                raise APIError(400, f"{field}: {im.width}x{im.height} is more than {limits.max_image_pixels} "
                               "pixels", param=field)
            im.load()
            return im.convert(mode) if mode == "RGB" or im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info \
                else im.convert("RGB")
        except APIError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise APIError(400, f"{field}: not a readable image ({e})", param=field) from None

    def snap(wh: tuple[int, int]) -> tuple[int, int]:
        """'auto' size of an edit: the first image's size, rounded to the stride and shrunk into the limits."""
        w, h = wh
        scale = min(1.0, (max_pixels / (w * h)) ** 0.5)
        return (max(stride, int(w * scale) // stride * stride), max(stride, int(h * scale) // stride * stride))

    @app.get("/v1/models", summary="The served model")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "glmimage"}]}

    @app.get("/health", summary="Liveness and queue length")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": engine.queued, "max_queue": engine.max_queue,
                "stride": stride, "default_size": f"{pipe.cfg.sampling.width}x{pipe.cfg.sampling.height}",
                "auth": api_key is not None}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return resources.files("glmimage.serve").joinpath("playground.html").read_text()

    return app


def composite(images: list[Image.Image], base: Image.Image, alpha: Image.Image, size: tuple[int, int]) -> list:
    """Where the mask is opaque, the first condition image; where it is transparent, the generated image."""
    keep = np.asarray(alpha.resize(size, Image.NEAREST)) > 0
    first = np.asarray(base.resize(size, Image.LANCZOS))
    return [Image.fromarray(np.where(keep[..., None], first, np.asarray(im))) for im in images]


def encode(image: Image.Image, fmt: str, compression: int | None) -> str:
    buf = io.BytesIO()
    kw = {} if fmt == "png" or compression is None else {"quality": compression}
    image.save(buf, format=FORMATS[fmt], **kw)
    return base64.b64encode(buf.getvalue()).decode()


def _form_schema(prop: dict) -> dict:
    """Form fields arrive as strings; keep the JSON schema's description and bounds for the docs."""
    keep = {k: v for k, v in prop.items() if k in ("description", "minimum", "maximum", "enum", "default",
                                                     "minLength", "maxLength", "exclusiveMinimum")}
    t = prop.get("type") or next((a.get("type") for a in prop.get("anyOf", []) if a.get("type") != "null"), "string")
    return {"type": t, **keep}


def _param(errors) -> str | None:
    loc = [p for p in (errors[0].get("loc") or ()) if p != "body"] if errors else []
    return str(loc[0]) if loc else None


def _explain(errors) -> str:
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_unauthenticated_remote: bool) -> None:
    """Binding beyond loopback needs an API key or an explicit opt-out."""
    if not is_loopback(host) and api_key is None and not allow_unauthenticated_remote:
        raise ValueError(f"refusing to serve {host} without an API key: pass --api-key KEY, or "
                         "--allow-unauthenticated-remote to expose the model to anyone who can reach it")


def serve(pipe, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          allow_unauthenticated_remote: bool = False, model_name: str = "glmimage", max_queue: int = 16,
          max_batch: int = 4, timeout: float = 300.0) -> None:
    """Run the API with uvicorn (blocking). Binding beyond loopback needs an API key or an explicit opt-out."""
    import uvicorn

    check_bind(host, api_key, allow_unauthenticated_remote)
    app = create_app(pipe, model_name=model_name, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                     limits=Limits(timeout=timeout))
    uvicorn.run(app, host=host, port=port, log_level="info")
