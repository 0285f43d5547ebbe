"""`wardrobe serve`: a real server on 127.0.0.1 in a subprocess, serving the tiny run's ONNX model;
its answers are `wardrobe predict`'s, bad requests get one line of JSON and the service goes on,
an overload gets 503s and recovers, and the page works in headless Chromium with the network cut."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import module_env, run_module
from wardrobe.model.file import load_onnx_classifier
from wardrobe.outputs import ONNX_PATH, SERVING_DISTANCE

pytestmark = pytest.mark.pipeline  # a server and wardrobe predict in subprocesses

CHROMIUM = shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, cwd: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wardrobe", "serve", "--port", str(self.port), *options],
            cwd=cwd,
            env=module_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else ""
            assert time.monotonic() < deadline, "the server did not get ready in 60 s"
            try:
                if self.get("/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request(path)

    def post(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
        status, body = self.request(path, data, {"Content-Type": content_type})
        assert body.count(b"\n") <= 1, body  # one line of JSON
        return status, json.loads(body)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="picture"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files.items()
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[Server]:
    running = Server(tiny_run, "--max-body-mb", "1")
    yield running
    running.stop()


def predicted(tiny_run: Path, *names: str) -> list[dict]:
    result = run_module("wardrobe", "predict", *names, "--json", "--top-k", "3", "--runtime", "onnx", cwd=tiny_run)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_answers_are_wardrobe_predicts(server: Server, tiny_run: Path) -> None:
    names = ["pngs/000.png", "pngs/001.png", "pngs/017.png"]
    expected = predicted(tiny_run, *names)
    status, one = server.post("/predict", (tiny_run / names[0]).read_bytes())
    assert status == 200
    assert one["model"] == hashlib.sha256((tiny_run / ONNX_PATH).read_bytes()).hexdigest()
    assert {key: one["pictures"][0][key] for key in expected[0] if key != "path"} == {
        key: value for key, value in expected[0].items() if key != "path"
    }
    body, content_type = multipart({name: (tiny_run / name).read_bytes() for name in names})
    status, several = server.post("/predict", body, content_type)
    assert status == 200
    assert [picture["name"] for picture in several["pictures"]] == names
    for picture, want in zip(several["pictures"], expected, strict=True):
        assert picture["top_k"] == want["top_k"] and picture["unlike_training"] == want["unlike_training"]


def declared_only(server: Server, length: int) -> tuple[int, dict]:
    """Send only the headers of a POST /predict that declares `length` bytes; the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_bad_request_gets_its_code_and_the_next_good_one_works(server: Server, tiny_run: Path) -> None:
    good = (tiny_run / "pngs/000.png").read_bytes()
    huge = png_bytes(np.zeros((9000, 9000), np.uint8))  # 81 megapixels of black: a small file
    cases = [
        ("/predict", b"not a picture", 400, "not a readable image"),
        ("/predict", good[: len(good) // 2], 400, "cannot decode image"),  # truncated
        ("/predict", b"", 400, "empty request"),
        ("/predict", huge, 413, "pixel cap"),
        ("/predict?top_k=99", good, 400, "top_k must be"),
        ("/predict", b"--x\r\nbroken", 400, ""),  # as multipart below
    ]
    for path, data, code, words in cases:
        content_type = "multipart/form-data; boundary=x" if data.startswith(b"--x") else "application/octet-stream"
        status, body = server.post(path, data, content_type)
        assert status == code and words in body["error"], (path, status, body)
        assert server.post("/predict", good)[0] == 200  # still serving
    # A body over --max-body-mb 1, refused from its Content-Length before it is sent (a client
    # that kept writing would see the connection closed under it: the answer comes first).
    status, body = declared_only(server, 2 * 2**20)
    assert status == 413 and "byte cap" in body["error"], body
    assert server.post("/predict", good)[0] == 200
    status, body = server.request("/etc/passwd")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    assert server.get("/health") == (200, b'{"status":"ok"}')
    metrics = server.get("/metrics")[1].decode()
    assert 'wardrobe_requests_total{code="413",route="/predict"} 2.0' in metrics  # the pixel cap, the body cap
    assert "wardrobe_batch_pictures_bucket" in metrics and "wardrobe_request_seconds_bucket" in metrics


def slower_model(source: Path, target: Path, width: int = 2048, layers: int = 4) -> None:
    """`source` with a heavy branch that changes no answer: `layers` width×width products of the
    pixels, whose sum times zero is added to the distance. The tiny MLP classifies faster than the
    server decodes pictures, so its queue never fills; this real ONNX Runtime work (a few ms a
    picture) lets requests outrun the model, as the default model under load does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(source)
    graph = model.graph
    producer = next(node for node in graph.node if SERVING_DISTANCE in node.output)
    producer.output[list(producer.output).index(SERVING_DISTANCE)] = "light_distance"
    pixels = int(np.prod([d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]))
    rng = np.random.default_rng(0)
    graph.initializer.extend(
        [
            numpy_helper.from_array((rng.standard_normal((pixels, width)) * 0.01).astype(np.float32), "heavy_in"),
            numpy_helper.from_array((rng.standard_normal((width, width)) * 0.01).astype(np.float32), "heavy_w"),
            numpy_helper.from_array(np.array([1], np.int64), "heavy_axes"),
            helper.make_tensor("heavy_zero", TensorProto.FLOAT, [], [0.0]),
        ]
    )
    nodes = [helper.make_node("Flatten", [graph.input[0].name], ["heavy_0"], axis=1)]
    nodes.append(helper.make_node("MatMul", ["heavy_0", "heavy_in"], ["heavy_1"]))
    for layer in range(1, layers + 1):
        nodes.append(helper.make_node("MatMul", [f"heavy_{layer}", "heavy_w"], [f"heavy_{layer + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"heavy_{layers + 1}", "heavy_axes"], ["heavy_sum"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"]))
    nodes.append(helper.make_node("Add", ["light_distance", "heavy_nothing"], [SERVING_DISTANCE]))
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, target)


def test_an_overload_gets_503s_and_recovers(tiny_run: Path, tmp_path: Path) -> None:
    """A queue of one request and no batching, 24 clients sending 300 pictures each at once, to a
    model slow enough to be outrun (its answers are the tiny model's)."""
    slower_model(tiny_run / ONNX_PATH, tmp_path / "slower.onnx")
    images = np.load(tiny_run / "data/prepared/x_test.npy")[:50]
    light, heavy = (
        load_onnx_classifier(path).classify(images, 50) for path in (tiny_run / ONNX_PATH, tmp_path / "slower.onnx")
    )
    for light_output, heavy_output in zip(light, heavy, strict=True):
        np.testing.assert_array_equal(light_output, heavy_output)
    overloaded = Server(tiny_run, "--max-queue", "1", "--no-batching", "--model", str(tmp_path / "slower.onnx"))
    try:
        body, content_type = multipart({f"{i}.png": (tiny_run / "pngs/000.png").read_bytes() for i in range(300)})
        codes: list[int] = []

        def client() -> None:
            codes.append(overloaded.request("/predict", body, {"Content-Type": content_type})[0])

        threads = [threading.Thread(target=client) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(codes) == {200, 503} and codes.count(503) >= 1, codes
        assert overloaded.post("/predict", (tiny_run / "pngs/000.png").read_bytes())[0] == 200
        assert overloaded.get("/ready")[0] == 200
    finally:
        overloaded.stop()


def test_the_server_binds_to_this_machine_only(server: Server) -> None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if Path("/proc/net/tcp").exists() else []:
        local = line.split()[1]
        if int(local.split(":")[1], 16) == server.port:
            assert local.split(":")[0] == "0100007F"  # 127.0.0.1
            break
    else:
        pytest.fail("the server's socket is not in /proc/net/tcp")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here (.ci/run installs it)")
def test_the_page_classifies_an_uploaded_picture_offline(server: Server, tiny_run: Path) -> None:
    """Headless Chromium, every request but the server's aborted: the page loads with nothing from
    elsewhere, takes a test PNG and shows wardrobe predict's top class."""
    from playwright.sync_api import sync_playwright

    expected = predicted(tiny_run, "pngs/003.png")[0]["top_k"][0]["class"]
    blocked, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()

        def only_the_server(route) -> None:
            if route.request.url.startswith(server.url):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        page.route("**/*", only_the_server)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/", wait_until="load")
        page.set_input_files("#file", str(tiny_run / "pngs/003.png"))
        page.wait_for_selector("#result .top", timeout=30_000)
        shown = page.inner_text("#result .top")
        bars = page.locator("#result .bar").count()
        browser.close()
    assert (shown, bars, blocked, errors) == (expected, 3, [], [])
