"""lora-serve end to end: the real command in a subprocess on a free loopback port, tiny adapters
with 2, 4 and 5 labels; concurrent requests for several adapters, each answer checked against
offline predictions; every bad input gets its 4xx JSON error and the next good request is still
answered; reload; graceful shutdown. The batcher alone is tested in-process."""

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import LABELS, random_adapter  # noqa: E402
from lora.classifier import load_classifier  # noqa: E402
from lora.serve.batching import Batcher, DeadlineExceeded, Overloaded  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STARTUP_SECONDS = 120  # importing torch, transformers and FastAPI on a loaded 2-core machine
REQUEST_SECONDS = 30
ADAPTERS = {
    "two": ["no", "yes"],
    "four": LABELS,
    "five": ["a", "b", "c", "d", "e"],
    "four_dora": LABELS,
    "four_onnx": LABELS,
}
TEXTS = [
    "Team wins the cup after a late goal",
    "",
    "Stocks rally as bank profit beats forecasts",
    "new chip for online research",
    "war election minister troops",
    "the market said today",
]
# Offline predictions (merged, one adapter at a time) against the server's mixed batches:
# float32 sums in another order, equal to ~1e-6.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(adapters_dir: Path, log: Path, *flags: str):
    """``python serve.py`` on a free loopback port, with the API key set; yields ``(process, url)``
    once /healthz answers; always stopped (SIGTERM, then SIGKILL) and waited for."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_API_KEY": API_KEY}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--adapters-dir", str(adapters_dir), "--port", str(port), *flags],
            cwd=REPO,
            env=env,
            stdout=stderr,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"no answer within {STARTUP_SECONDS} s: {log.read_text()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, trained_runs, tmp_path_factory):
    """Five adapters: ``four`` and ``four_dora`` as train.py wrote them (AG News' labels; LoRA and
    DoRA on a float base), ``four_onnx`` the LoRA run exported by ``lora-export --format onnx``,
    ``two`` and ``five`` hand-made (train.py writes four labels only); ``quantized``, a train.py run
    on an nf4 base (served alone by predict.py, refused here); one of another base, and a link to
    an adapter outside the folder."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(trained_runs["lora"], root / "four")
    shutil.copytree(trained_runs["dora"], root / "four_dora")
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        from lora.cli.export import main as export_main

        export_main([str(trained_runs["lora"]), str(root / "four_onnx"), "--format", "onnx"])  # run by ONNX Runtime
    else:  # without the onnx extra: the same adapter, served as LoRA
        shutil.copytree(trained_runs["lora"], root / "four_onnx")
    shutil.copytree(trained_runs["nf4"], root / "quantized")
    random_adapter(tiny_model_dir, root / "two", labels=ADAPTERS["two"], r=2, seed=0)
    random_adapter(
        tiny_model_dir, root / "five", labels=ADAPTERS["five"], r=6, seed=2, targets=("value", "output.dense")
    )
    other = random_adapter(tiny_model_dir, root / "other_base", seed=7)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model": "roberta-large"}))
    outside = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("elsewhere") / "outside", seed=8)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def offline(adapters_dir):
    """Each adapter's probabilities for TEXTS, loaded alone and merged (what predict.py gives; an
    ONNX export through ONNX Runtime)."""

    def alone(folder):
        if (folder / "onnx_config.json").is_file():
            from lora.serve.onnx import load_onnx_classifier

            return load_onnx_classifier(folder)
        return load_classifier(folder, device="cpu")

    return {name: alone(adapters_dir / name).predict_proba(TEXTS) for name in ADAPTERS}


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(adapters_dir, log, "--batch-wait-ms", "20", "--max-texts", "8", "--max-body-bytes", "4096") as (
        process,
        url,
    ):
        yield url


def classify(url, adapter, texts, **kwargs):
    return httpx.post(
        f"{url}/v1/classify", json={"adapter": adapter, "texts": texts}, headers=AUTH, timeout=REQUEST_SECONDS, **kwargs
    )


def check_answer(response, name, rows, offline) -> None:
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(rows)
    for prediction, row in zip(predictions, rows):
        want = offline[name][row]
        assert list(prediction["probabilities"]) == ADAPTERS[name]
        assert prediction["label"] == ADAPTERS[name][int(want.argmax())]
        assert max(abs(p - w) for p, w in zip(prediction["probabilities"].values(), want)) < TOLERANCE


@pytest.mark.timeout(300)
def test_concurrent_requests_for_several_adapters_each_get_their_own_answers(server, offline):
    jobs = [(list(ADAPTERS)[i % len(ADAPTERS)], [(i + k) % len(TEXTS) for k in range(1 + i % 4)]) for i in range(40)]
    before = httpx.get(f"{server}/healthz", timeout=REQUEST_SECONDS).json()["batches"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: classify(server, job[0], [TEXTS[r] for r in job[1]]), jobs))
    for (name, rows), response in zip(jobs, responses):
        check_answer(response, name, rows, offline)
    batches = httpx.get(f"{server}/healthz", timeout=REQUEST_SECONDS).json()["batches"] - before
    assert batches < len(jobs)  # requests that arrived together ran in one mixed batch


@pytest.mark.timeout(300)
def test_every_bad_input_gets_a_json_4xx_and_the_next_good_request_is_answered(server, offline):
    url = f"{server}/v1/classify"

    def raw(body: bytes, headers=AUTH):
        return httpx.post(
            url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=REQUEST_SECONDS
        )

    bad = {
        "unknown adapter": (
            lambda: classify(server, "nine", ["goal"]),
            404,
            "unknown adapter 'nine'; served: five, four, four_dora, four_onnx, two",
        ),
        "empty texts": (lambda: classify(server, "two", []), 422, "texts must be a non-empty list of strings"),
        "texts not a list": (lambda: classify(server, "two", "goal"), 422, "texts must be a non-empty list"),
        "non-string text": (lambda: classify(server, "two", ["goal", 3]), 422, "texts[1] is a int, not a string"),
        "too many texts": (lambda: classify(server, "two", ["goal"] * 9), 413, "9 texts in one request; at most 8"),
        "body over the limit": (lambda: classify(server, "two", ["goal " * 1000]), 413, "over the limit of 4096"),
        "malformed JSON": (lambda: raw(b'{"adapter": "two", "texts": ['), 400, "request body is not valid JSON"),
        "not an object": (lambda: raw(b'["two", "goal"]'), 422, 'must be a JSON object {"adapter"'),
        "path traversal": (
            lambda: classify(server, "../two", ["goal"]),
            400,
            "adapter must be the name of a sub-folder",
        ),
        "absolute path": (lambda: classify(server, "/etc", ["goal"]), 400, "adapter must be the name of a sub-folder"),
        "folder outside the directory": (
            lambda: classify(server, "linked", ["goal"]),
            409,
            "lies outside the adapters directory",
        ),
        "another base": (
            lambda: classify(server, "other_base", ["goal"]),
            409,
            "was trained on base 'roberta-large', not on",
        ),
        "no API key": (lambda: raw(b'{"adapter": "two", "texts": ["goal"]}', headers={}), 401, "API key"),
        "wrong API key": (
            lambda: raw(b'{"adapter": "two", "texts": ["goal"]}', headers={"Authorization": "Bearer nope"}),
            401,
            "API key",
        ),
        "unknown route": (
            lambda: httpx.get(f"{server}/v1/nothing", headers=AUTH, timeout=REQUEST_SECONDS),
            404,
            "Not Found",
        ),
    }
    for case, (send, status, message) in bad.items():
        response = send()
        assert response.status_code == status, (case, response.text)
        assert message in response.json()["error"], (case, response.text)
        check_answer(classify(server, "five", TEXTS[:2]), "five", [0, 1], offline)
    assert httpx.get(f"{server}/healthz", timeout=REQUEST_SECONDS).status_code == 200  # no key needed


@pytest.mark.timeout(300)
def test_listing_and_reload_pick_up_new_folders_and_drop_removed_ones(server, adapters_dir, offline):
    listing = httpx.get(f"{server}/v1/adapters", headers=AUTH, timeout=REQUEST_SECONDS).json()
    assert [adapter["name"] for adapter in listing["adapters"]] == ["five", "four", "four_dora", "four_onnx", "two"]
    assert listing["adapters"][2] == {
        "name": "four_dora",
        "labels": LABELS,
        "r": 4,
        "target_modules": ["query", "value"],
        "dora": True,
        "runs_as": "lora",
    }
    onnx = importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")
    assert listing["adapters"][3]["runs_as"] == ("onnx" if onnx else "lora")
    assert [refused["name"] for refused in listing["refused"]] == ["linked", "other_base", "quantized"]
    assert "trained on a nf4 base" in listing["refused"][2]["reason"]

    shutil.copytree(adapters_dir / "two", adapters_dir / "two_again")
    shutil.move(adapters_dir / "four", adapters_dir.parent / "four_removed")
    try:
        changes = httpx.post(f"{server}/v1/adapters/reload", headers=AUTH, timeout=REQUEST_SECONDS).json()
        assert (changes["added"], changes["removed"]) == (["two_again"], ["four"])
        assert classify(server, "four", ["goal"]).status_code == 404
        response = classify(server, "two_again", TEXTS)
        check_answer(response, "two", range(len(TEXTS)), offline)  # the same adapter files
    finally:
        shutil.rmtree(adapters_dir / "two_again")
        shutil.move(adapters_dir.parent / "four_removed", adapters_dir / "four")
        httpx.post(f"{server}/v1/adapters/reload", headers=AUTH, timeout=REQUEST_SECONDS)
    check_answer(classify(server, "four", TEXTS[:3]), "four", [0, 1, 2], offline)


@pytest.mark.timeout(120)
def test_a_body_far_over_the_limit_sent_whole_before_reading_gets_the_json_413(server):
    # urllib sends no "Expect: 100-continue": it writes all 8 MB, then reads. Answered at once
    # and closed, it saw "connection reset"; the server now reads the rest away first.
    body = b'{"adapter": "two", "texts": ["' + b"g" * 8_000_000 + b'"]}'
    request = urllib.request.Request(
        f"{server}/v1/classify", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=REQUEST_SECONDS)
    assert caught.value.code == 413
    assert json.loads(caught.value.read()) == {"error": f"request body of {len(body)} bytes is over the limit of 4096"}


@pytest.mark.timeout(300)
def test_overload_is_refused_with_429_and_a_late_request_gets_504_with_its_texts_dropped(
    adapters_dir, offline, tmp_path
):
    # Batches close at 4 texts or after 800 ms; a request has 500 ms; at most 6 texts queued.
    flags = [
        "--max-batch",
        "4",
        "--batch-wait-ms",
        "800",
        "--max-texts",
        "5",
        "--max-queued-texts",
        "6",
        "--request-timeout",
        "0.5",
    ]
    with running_server(adapters_dir, tmp_path / "server.log", *flags) as (process, url):
        before = httpx.get(f"{url}/healthz", timeout=REQUEST_SECONDS).json()
        with ThreadPoolExecutor(max_workers=2) as pool:
            late = pool.submit(classify, url, "four", TEXTS[:2])  # waits 800 ms for company: past its deadline
            time.sleep(0.2)
            refused = classify(url, "four", TEXTS[:5])  # 2 + 5 queued texts > 6
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert (
                "the server is at capacity: 2 texts queued, 5 more would pass the limit of 6" in refused.json()["error"]
            )
            response = late.result(timeout=REQUEST_SECONDS)
        assert response.status_code == 504, response.text
        assert "no answer within the request timeout of 0.5 s" in response.json()["error"]
        time.sleep(1)  # the batch it waited in has closed meanwhile: nothing left to run
        health = httpx.get(f"{url}/healthz", timeout=REQUEST_SECONDS).json()
        assert (health["batches"], health["queued_texts"]) == (before["batches"], 0)  # dropped, never computed
        assert (health["refused"], health["expired"]) == (1, 1)
        check_answer(classify(url, "four", TEXTS[:4]), "four", range(4), offline)  # a full batch runs at once


@pytest.mark.timeout(300)
def test_shutdown_answers_the_requests_in_flight(adapters_dir, offline, tmp_path):
    # A long batching wait keeps the requests in flight while SIGTERM arrives.
    with running_server(adapters_dir, tmp_path / "server.log", "--batch-wait-ms", "1500") as (process, url):
        with ThreadPoolExecutor(max_workers=len(ADAPTERS)) as pool:
            pending = [pool.submit(classify, url, name, TEXTS[:2]) for name in ADAPTERS]
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            for name, future in zip(ADAPTERS, pending):
                check_answer(future.result(timeout=REQUEST_SECONDS), name, [0, 1], offline)
        # uvicorn re-raises the signal once it has shut down, so that its parent sees why it ended.
        assert process.wait(timeout=60) == -signal.SIGTERM
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)


@pytest.mark.timeout(30)
def test_the_batcher_mixes_requests_that_arrive_together_and_isolates_failures():
    calls = []

    def predict(texts, adapters):
        calls.append(list(zip(texts, adapters)))
        if "bad" in texts:
            raise ValueError("bad text")
        return [f"{adapter}:{text}" for text, adapter in zip(texts, adapters)]

    async def scenario(max_rows):
        batcher = Batcher(predict, max_rows=max_rows, max_wait_s=0.2)
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit("a", ["1", "2"]),
            batcher.submit("b", ["3"]),
            batcher.submit("c", ["bad"]),
            batcher.submit("a", ["4"]),
            return_exceptions=True,
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario(max_rows=64))
    assert results[:2] + results[3:] == [["a:1", "a:2"], ["b:3"], ["a:4"]]
    assert isinstance(results[2], ValueError)
    assert calls[0] == [("1", "a"), ("2", "a"), ("3", "b"), ("bad", "c"), ("4", "a")]  # one mixed batch
    assert len(calls) == 1 + 4  # then request by request, so that only the bad one fails

    calls.clear()
    results = asyncio.run(scenario(max_rows=1))  # batching off: every request alone
    assert calls == [[("1", "a"), ("2", "a")], [("3", "b")], [("bad", "c")], [("4", "a")]]


@pytest.mark.timeout(30)
def test_the_batcher_refuses_past_its_bound_and_drops_requests_past_their_deadline():
    calls = []

    def slow_predict(texts, adapters):
        calls.append(list(texts))
        time.sleep(0.3)
        return list(texts)

    async def overload():
        batcher = Batcher(slow_predict, max_rows=8, max_wait_s=0, max_queued_texts=4)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", ["1", "2", "3"]))
        await asyncio.sleep(0.05)
        with pytest.raises(
            Overloaded, match="3 texts queued, 2 more would pass the limit of 4; retry in 1 s"
        ) as caught:
            await batcher.submit("a", ["4", "5"])
        assert caught.value.retry_after_s == 1 and batcher.queued_texts == 3  # nothing of it queued
        assert await first == ["1", "2", "3"] and batcher.queued_texts == 0
        assert await batcher.submit("a", ["6", "7", "8", "9"]) == ["6", "7", "8", "9"]  # room again
        await batcher.stop()
        return batcher

    batcher = asyncio.run(overload())
    assert calls == [["1", "2", "3"], ["6", "7", "8", "9"]] and batcher.refused == 1

    async def deadline():
        batcher = Batcher(slow_predict, max_rows=1, max_wait_s=0, request_timeout_s=0.15)
        await batcher.start()
        results = await asyncio.gather(batcher.submit("a", ["x"]), batcher.submit("a", ["y"]), return_exceptions=True)
        await asyncio.sleep(0.4)  # x's batch ends; y, still queued, must never run
        await batcher.stop()
        return batcher, results

    calls.clear()
    batcher, results = asyncio.run(deadline())
    assert all(isinstance(result, DeadlineExceeded) for result in results), results
    assert calls == [["x"]] and batcher.queued_texts == 0 and batcher.expired == 2


@pytest.mark.timeout(30)
def test_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from lora.cli import run_command
    from lora.cli.serve import main

    (tmp_path / "empty").mkdir()
    for argv, message in [
        (["--adapters-dir", str(tmp_path / "missing")], f"adapters directory {tmp_path / 'missing'} does not exist"),
        (["--adapters-dir", str(tmp_path / "empty")], "no adapter in the sub-folders of"),
        (["--adapters-dir", str(tmp_path / "empty"), "--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--adapters-dir", str(tmp_path / "empty"), "--port", "70000"], "--port must be in 0..65535"),
        (
            ["--adapters-dir", str(tmp_path / "empty"), "--max-queued-texts", "100"],
            "--max-queued-texts (100) must be at least --max-texts (256)",
        ),
        (["--adapters-dir", str(tmp_path / "empty"), "--request-timeout", "0"], "--request-timeout must be > 0"),
    ]:
        with pytest.raises(SystemExit) as caught:
            run_command(lambda argv=argv: main(argv))
        err = capsys.readouterr().err
        assert caught.value.code == 2 and err.count("\n") == 1 and message in err, err
