"""The HTTP API: contract, the official openai client, bad input, queueing, auth, and a bounded load test."""
import asyncio
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import glmimage
from glmimage.cli import main as cli
from glmimage.dit.model import fill_zero_params
from glmimage.serve import Engine, Job, Limits, QueueFull, create_app

FAST = {"num_inference_steps": 2, "size": "64x64"}


@pytest.fixture(scope="module")
def pipe():
    p = glmimage.load("debug", device="cpu")
    fill_zero_params(p.dit)  # the debug DiT is zero-initialised: give it weights so images are not flat
    return p


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, model_name="debug")) as c:
        yield c


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_bytes(size=(64, 64), mode="RGB", color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------------------------
def test_generations_contract(client):
    r = client.post("/v1/images/generations", json={"prompt": "a sign that says 'OPEN'", "n": 2, "seed": 7, **FAST})
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"created", "data", "timings", "size", "output_format"}
    assert abs(body["created"] - time.time()) < 60
    assert len(body["data"]) == 2 and body["data"][0]["revised_prompt"] == "a sign that says 'OPEN'"
    images = [decode(d["b64_json"]) for d in body["data"]]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    assert np.asarray(images[0]).std() > 1  # a real picture
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 7 and 8
    assert {"queue", "ar", "dit", "vae", "total"} <= set(body["timings"])
    again = client.post("/v1/images/generations", json={"prompt": "a sign that says 'OPEN'", "n": 1, "seed": 8, **FAST})
    solo = np.asarray(decode(again.json()["data"][0]["b64_json"])).astype(int)
    assert np.abs(solo - np.asarray(images[1]).astype(int)).max() <= 1  # batching does not change an image


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "output_format": fmt,
                                                     "output_compression": 80, **FAST})
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).format == pil


def test_edits_with_images_and_mask(client):
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 64))  # left half transparent: the area to edit
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    files = [("image", ("a.png", png_bytes((96, 64)), "image/png")),
             ("image", ("b.jpg", png_bytes((64, 64), fmt="JPEG"), "image/jpeg")),
             ("mask", ("m.png", buf.getvalue(), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", "num_inference_steps": "2",
                                                           "seed": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    out = np.asarray(decode(body["data"][0]["b64_json"]))
    assert body["size"] == "96x64" and out.shape == (64, 96, 3)  # auto: the first image's size
    assert (out[:, 60:] == [200, 30, 30]).all()  # outside the mask: the first image, untouched
    assert not (out[:, :40] == [200, 30, 30]).all()  # inside: generated


def test_models_health_openapi(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "debug"
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/health"} <= set(schema["paths"])
    edit = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in edit


def test_playground_page(client):
    r = client.get("/")
    assert r.status_code == 200 and "glmimage" in r.text and "/v1/images/generations" in r.text


# ---------------------------------------------------------------------------------------------------------------
# Bad input: 4xx with a clear JSON error, the server keeps serving
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "size": "65x64"}, 400, "multiples of 32"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "at most"),
    ({"prompt": "x", "size": "32x256"}, 400, "aspect"),
    ({"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "blank"),
    ({"prompt": "x" * 5000}, 400, "at most 4000"),
    ({"prompt": "x", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stream": True}, 400, "stream"),
    ({"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    ({"n": 1}, 400, "prompt"),
])
def test_bad_generation_requests(client, body, status, needle):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_malformed_json(client):
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 50 kB on the wire, 400 M pixels
    return buf.getvalue()


@pytest.mark.parametrize("files,data,needle", [
    ([], {"prompt": "x"}, "no image"),
    ([("image", ("a.txt", b"hello, not an image", "text/plain"))], {"prompt": "x"}, "not a readable image"),
    ([("image", ("a.gif", png_bytes(fmt="GIF"), "image/gif"))], {"prompt": "x"}, "GIF"),
    ([("image", ("b.png", bomb(), "image/png"))], {"prompt": "x"}, "pixels"),
    ([("image", (f"{i}.png", png_bytes(), "image/png")) for i in range(5)], {"prompt": "x"}, "at most 4"),
    ([("image", ("a.png", png_bytes(), "image/png")), ("mask", ("m.png", png_bytes((32, 32), "RGBA", (0, 0, 0, 0)),
                                                                "image/png"))], {"prompt": "x"}, "mask is 32x32"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"prompt": "x", "n": "many"}, "n"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {}, "prompt"),
])
def test_bad_edit_requests(client, files, data, needle):
    r = client.post("/v1/images/edits", files=files or None, data=data)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_broken_multipart(client):
    r = client.post("/v1/images/edits", content=b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400
    r = client.post("/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------------------------
# Auth, queue, timeouts
# ---------------------------------------------------------------------------------------------------------------
def test_api_key(pipe):
    with TestClient(create_app(pipe, api_key="s3cret")) as c:
        assert c.post("/v1/images/generations", json={"prompt": "x", **FAST}).status_code == 401
        bad = c.post("/v1/images/generations", json={"prompt": "x", **FAST}, headers={"Authorization": "Bearer no"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]
        ok = c.post("/v1/images/generations", json={"prompt": "x", **FAST}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/v1/models").status_code == 401 and c.get("/health").status_code == 200


def test_refuses_remote_bind_without_key(capsys):
    assert cli(["serve", "--model", "debug", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


class BlockingPipe:
    """Stands in for a pipeline whose generation blocks until released (to fill the queue)."""

    def __init__(self, cfg):
        self.cfg, self.release, self.calls = cfg, threading.Event(), []

    def __call__(self, prompts, **kw):
        self.calls.append((list(prompts), kw))
        self.release.wait(30)
        return glmimage.Result(images=[Image.new("RGB", (64, 64))] * len(prompts),
                               timings={"ar": 0.0, "dit": 0.0, "vae": 0.0, "total": 0.0})


def test_full_queue_answers_429_and_timeouts_504(pipe):
    slow = BlockingPipe(pipe.cfg)
    app = create_app(slow, max_queue=1, max_batch=1, limits=Limits(timeout=1.0))
    with TestClient(app) as c:
        results = {}

        def post(i):
            results[i] = c.post("/v1/images/generations", json={"prompt": f"p{i}", **FAST})

        first = threading.Thread(target=post, args=(0,))
        first.start()
        deadline = time.time() + 10
        while not slow.calls and time.time() < deadline:  # the worker holds request 0
            time.sleep(0.01)
        second = threading.Thread(target=post, args=(1,))
        second.start()
        while app.state.engine.queued < 1 and time.time() < deadline:  # request 1 waits in the queue
            time.sleep(0.01)
        third = c.post("/v1/images/generations", json={"prompt": "p2", **FAST})
        assert third.status_code == 429 and third.headers["retry-after"] == "2"
        first.join()
        second.join()
        slow.release.set()
        assert results[0].status_code == 504 and results[1].status_code == 504
        assert app.state.engine.queued == 0  # the timed-out waiting request gave its slot back


def test_client_disconnect_frees_its_slot(pipe):
    """A client that hangs up while its request waits in the queue gives the slot back (live server, raw socket)."""
    import json

    import uvicorn

    slow = BlockingPipe(pipe.cfg)
    app = create_app(slow, max_queue=2, max_batch=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        body = json.dumps({"prompt": "x", **FAST}).encode()
        request = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        socks = []
        for _ in range(2):  # the first is taken by the (blocked) worker, the second waits in the queue
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            socks.append(sock)
            time.sleep(0.3)
        deadline = time.time() + 10
        while app.state.engine.queued != 1 and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.engine.queued == 1
        socks[1].close()  # the waiting client hangs up
        while app.state.engine.queued != 0 and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.engine.queued == 0
    finally:
        slow.release.set()
        for sock in socks:
            sock.close()
        srv.should_exit = True
        thread.join(10)


def test_engine_batches_compatible_jobs_and_cancels(pipe):
    slow = BlockingPipe(pipe.cfg)
    engine = Engine(slow, max_queue=8, max_batch=4, batch_wait=0.2)
    try:
        blocker = Job(prompt="first", seeds=[0], params={"height": 64})
        engine.submit(blocker)
        while not slow.calls:
            time.sleep(0.01)
        a = Job(prompt="a", seeds=[1, 2], params={"height": 64})
        b = Job(prompt="b", seeds=[3], params={"height": 64})
        other = Job(prompt="c", seeds=[4], params={"height": 128})
        gone = Job(prompt="d", seeds=[5], params={"height": 64})
        for j in (a, b, other, gone):
            engine.submit(j)
        assert engine.cancel(gone) and engine.queued == 3
        for i in range(5):  # fill the queue to its bound of 8
            engine.submit(Job(prompt="filler", seeds=[i], params={"height": 999}))
        with pytest.raises(QueueFull):
            engine.submit(Job(prompt="x", seeds=[0], params={}))
        slow.release.set()
        a.future.result(10), b.future.result(10), other.future.result(10)
        prompts = [c[0] for c in slow.calls]
        assert ["a", "a", "b"] in prompts and ["c"] in prompts and not any("d" in p for p in prompts)
        assert dict(slow.calls[prompts.index(["a", "a", "b"])][1])["seed"] == [1, 2, 3]
    finally:
        slow.release.set()
        engine.close()


# ---------------------------------------------------------------------------------------------------------------
# A real server on loopback: the openai client, and a bounded load test
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(pipe):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe, model_name="debug", api_key="k", max_queue=64, max_batch=8)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


def test_openai_client(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="k")
    r = client.images.generate(prompt="a yellow star", n=2, size="64x64", response_format="b64_json",
                               extra_body={"num_inference_steps": 2, "seed": 4})
    assert len(r.data) == 2 and decode(r.data[0].b64_json).size == (64, 64)
    e = client.images.edit(image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")],
                           prompt="make it green", size="64x64", extra_body={"num_inference_steps": 2})
    assert decode(e.data[0].b64_json).size == (64, 64)
    assert [m.id for m in client.models.list().data] == ["debug"]
    with pytest.raises(openai.BadRequestError, match="multiples of 32"):
        client.images.generate(prompt="x", size="100x100")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").images.generate(prompt="x", size="64x64")


def test_load_64_concurrent_clients(server):
    """64 clients at once on loopback: zero 5xx, every image valid, batches formed, memory bounded."""
    import httpx

    from glmimage.pipeline import peak_host_memory_mib

    url, app = server
    before = peak_host_memory_mib()
    batches_before = app.state.engine.batches_run

    async def one(client, i):
        r = await client.post(url + "/v1/images/generations", json={"prompt": f"a red circle number {i}",
                                                                     "seed": i, **FAST})
        return r

    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": "Bearer k"}) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    t = time.time()
    responses = asyncio.run(main())
    elapsed = time.time() - t
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    for r in responses:
        assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    batches = app.state.engine.batches_run - batches_before
    assert batches < 64  # requests were batched together
    assert max(r.json()["timings"]["batch_rows"] for r in responses) > 1
    assert peak_host_memory_mib() - before < 500  # MiB
    assert elapsed < 120


# ---------------------------------------------------------------------------------------------------------------
# The playground in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
# ---------------------------------------------------------------------------------------------------------------
def _chromium():
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_playground_in_headless_chromium(pipe, tmp_path):
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(pipe, model_name="debug"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(f"http://127.0.0.1:{port}/")
        prompt = drv.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a sign that says 'HI'")
        drv.find_element(By.ID, "steps").send_keys("2")
        drv.find_element(By.ID, "seed").send_keys("3")
        drv.find_element(By.ID, "go").click()
        WebDriverWait(drv, 60).until(ec.presence_of_element_located((By.ID, "out")))
        assert drv.find_element(By.ID, "status").text == "done"
        assert "DiT" in drv.find_element(By.ID, "timings").text
        src = drv.find_element(By.ID, "out").get_attribute("src")
        img = decode(src.split(",", 1)[1])
        assert img.size == (64, 64) and np.asarray(img).std() > 1
        # an edit: upload an image, generate again; the history keeps both
        upload = tmp_path / "in.png"
        upload.write_bytes(png_bytes((64, 64)))
        drv.find_element(By.ID, "images").send_keys(str(upload))
        drv.find_element(By.ID, "go").click()
        WebDriverWait(drv, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history figure")) == 2)
        # a bad size shows the server's error in the page
        size = drv.find_element(By.ID, "size")
        size.clear()
        size.send_keys("65x64")
        drv.find_element(By.ID, "go").click()
        WebDriverWait(drv, 30).until(lambda d: "error" in d.find_element(By.ID, "status").text)
        assert "multiples of 32" in drv.find_element(By.ID, "status").text
        drv.save_screenshot(str(tmp_path / "playground.png"))
        assert (tmp_path / "playground.png").stat().st_size > 5000
    finally:
        drv.quit()
        srv.should_exit = True
        thread.join(10)


def test_edits_as_json_with_data_urls(client):
    url = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64))).decode()
    r = client.post("/v1/images/edits", json={"prompt": "make it blue", "images": [{"image_url": url}, url],
                                               "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)


@pytest.mark.parametrize("images,needle", [
    (["data:image/png;base64,@@@not-base64@@@"], "broken base64"),
    (["https://example.com/cat.png"], "data URLs"),
    ([{"file_id": "file-123"}], "data URLs"),
    (["data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode()], "not a readable image"),
    ("data:image/png;base64,AAAA", "list"),
    ([], "no image"),
])
def test_bad_json_edits(client, images, needle):
    r = client.post("/v1/images/edits", json={"prompt": "x", "images": images})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize("prompt", ["a sign <|image|> here", "x <|dit_token_5|>", "a <sop>2 2<eop>"])
def test_control_tokens_in_prompts_are_refused(client, prompt):
    """A prompt that spells a layout token would corrupt the AR prompt (and used to hang the worker)."""
    r = client.post("/v1/images/generations", json={"prompt": prompt, **FAST})
    assert r.status_code == 400 and "control token" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", json={"prompt": "ok", "negative_prompt": prompt, **FAST})
    assert r.status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": "a red circle", **FAST}).status_code == 200


def test_body_limits(pipe):
    small = Limits(max_images=1, max_upload_bytes=10_000, max_json_bytes=2_000)
    with TestClient(create_app(pipe, limits=small)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x" * 3000})
        assert r.status_code == 413
        def noise_png(side):
            buf = io.BytesIO()
            Image.fromarray(np.random.RandomState(0).randint(0, 255, (side, side, 3)).astype(np.uint8)).save(buf, "PNG")
            return buf.getvalue()

        r = c.post("/v1/images/edits", files=[("image", ("a.png", noise_png(120), "image/png"))], data={"prompt": "x"})
        assert r.status_code == 400 and "larger than 10000 bytes" in r.json()["error"]["message"]  # one file
        r = c.post("/v1/images/edits", files=[("image", ("a.png", noise_png(700), "image/png"))], data={"prompt": "x"})
        assert r.status_code == 413  # the whole body, refused before parsing

        def chunks():  # no Content-Length: the limit applies to the stream
            for _ in range(10):
                yield b'{"prompt": "' + b"x" * 500

        r = c.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/health").status_code == 200


def test_mask_without_transparency_is_refused(client):
    files = [("image", ("a.png", png_bytes(), "image/png")), ("mask", ("m.png", png_bytes(), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert r.status_code == 400 and "alpha" in r.json()["error"]["message"]


def test_auth_is_checked_before_the_body(pipe):
    with TestClient(create_app(pipe, api_key="k")) as c:
        assert c.post("/v1/images/generations", json={"n": "bad"}).status_code == 401
        assert c.post("/v1/images/edits", content=b"junk", headers={"content-type": "text/plain"}).status_code == 401


class FailingPipe:
    def __init__(self, cfg, exc):
        self.cfg, self.exc, self.calls = cfg, exc, 0

    def __call__(self, prompts, **kw):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return glmimage.Result(images=[Image.new("RGB", (64, 64))] * len(prompts),
                               timings={"ar": 0.0, "dit": 0.0, "vae": 0.0, "total": 0.0})


@pytest.mark.parametrize("exc,status", [(StopIteration(), 500), (RuntimeError("boom"), 500), (ValueError("bad"), 400)])
def test_a_failing_generation_answers_at_once_and_the_worker_survives(pipe, exc, status):
    with TestClient(create_app(FailingPipe(pipe.cfg, exc), limits=Limits(timeout=20))) as c:
        t = time.time()
        r = c.post("/v1/images/generations", json={"prompt": "x", **FAST})
        assert r.status_code == status and time.time() - t < 5  # no hang until the timeout
        assert c.post("/v1/images/generations", json={"prompt": "x", **FAST}).status_code == 200
