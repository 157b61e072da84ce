"""S3 that fails or stalls a share of requests: preprocess (reads of shards, tokenizer and listing; writes
of parquet and the manifest) retries through it with botocore's standard mode and its timeouts, and
ends with nothing lost. The faults come from a small proxy on 127.0.0.1 in front of the moto server:
every 5th request answers 503 SlowDown, every 11th is held past the read timeout and dropped."""

from __future__ import annotations

import http.client
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import s3fs

from imp_platform.data.pipeline import load_preprocess_config, preprocess
from imp_platform.data.sources import S3_CONFIG_DEFAULTS, filesystem

FAIL_EVERY, STALL_EVERY = 5, 11
READ_TIMEOUT_S, STALL_S = 2, 4  # a stall outlasts the client's read timeout, then the proxy drops it
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


class FaultyProxy(ThreadingHTTPServer):
    """Forwards S3 requests to ``upstream``, failing or stalling them on a fixed schedule."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream).netloc
        self.faults: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()

    def next_fault(self) -> str | None:
        with self._lock:
            self._count += 1
            n = self._count
        fault = "503" if n % FAIL_EVERY == 0 else "stall" if n % STALL_EVERY == 0 else None
        if fault:
            self.faults[fault] += 1
        return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: FaultyProxy

    def log_message(self, *args: object) -> None:
        """Quiet: one line per request would flood the test output."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _forward(self) -> None:
        body = self._body()
        fault = self.server.next_fault()
        if fault == "stall":
            time.sleep(STALL_S)
            self.close_connection = True
            return
        if fault == "503":
            self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self._reply(response.status, {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP},
                        data, head=self.command == "HEAD", length=response.getheader("Content-Length"))
        finally:
            upstream.close()

    def _reply(self, status: int, headers: dict[str, str], data: bytes, head: bool = False,
               length: str | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", length if head and length else str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def faulty_s3(s3_server: dict) -> Iterator[tuple[FaultyProxy, dict]]:
    """The proxy (stopped afterwards) and storage options that reach moto only through it."""
    proxy = FaultyProxy(s3_server["endpoint_url"])
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    options = {**s3_server["storage_options"], "endpoint_url": f"http://127.0.0.1:{proxy.server_address[1]}",
               "config_kwargs": {"read_timeout": READ_TIMEOUT_S, "connect_timeout": READ_TIMEOUT_S}}
    try:
        yield proxy, options
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=STALL_S + 5)


def _keys(fs: s3fs.S3FileSystem, root: str, manifest: dict) -> list[str]:
    files = [f"{root}/{f['path']}" for b in manifest["buckets"] for f in b["files"]]
    return sorted(k for path in files for k in pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist())


def test_s3_settings_reach_botocore_and_stay_overridable() -> None:
    fs, _ = filesystem("s3://imp-test/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"read_timeout": 7}})
    assert fs.config_kwargs == {**S3_CONFIG_DEFAULTS, "read_timeout": 7}
    assert S3_CONFIG_DEFAULTS["retries"]["mode"] == "standard" and S3_CONFIG_DEFAULTS["retries"]["max_attempts"] >= 5
    assert filesystem("/tmp/x", {})[0].protocol[0] == "file"  # local paths get no S3 settings


@pytest.mark.chaos
@pytest.mark.slow
def test_preprocess_through_failing_and_stalling_s3_loses_nothing(
        ray_local: None, s3_server: dict, faulty_s3: tuple[FaultyProxy, dict], synth_shards: dict[str, Path]) -> None:
    proxy, options = faulty_s3
    direct = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_server["bucket"]
    shard = sorted(synth_shards["test"].glob("*.tar"))[0]
    direct.put(str(shard), f"{bucket}/faults/raw/test/{shard.name}")
    direct.put(str(synth_shards["root"] / "tokenizer.json"), f"{bucket}/faults/raw/tokenizer.json")
    with tarfile.open(shard) as tar:
        expected = sorted({name.split(".", 1)[0] for name in tar.getnames()})

    out = f"{bucket}/faults/processed/test"
    manifests = []
    for _ in range(2):  # the second run replaces the first: its files go only after the new manifest
        cfg = load_preprocess_config(None, f"s3://{bucket}/faults/raw/test", f"s3://{out}", ["decode.num_actors=1"])
        cfg.source.storage_options = cfg.output.storage_options = options
        manifests.append(preprocess(cfg))

    assert proxy.faults["503"] > 0 and proxy.faults["stall"] > 0, proxy.faults
    last = manifests[-1]
    assert last["total_read"] == last["kept"] == len(expected) and last["skipped"] == {}
    direct.invalidate_cache()
    assert _keys(direct, out, last) == expected
    named = {f"{out}/{f['path']}" for b in last["buckets"] for f in b["files"]}
    assert set(direct.find(out)) == named | {f"{out}/manifest.json", f"{out}/tokenizer.json"}, \
        "the first run's files must be gone"
