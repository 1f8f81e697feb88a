"""net.fetch on the session's kernel against a local HTTP server: only allowed hosts,
redirects checked hop by hop, size and time limits, children never wider than their
parent, sandboxed processes too, and every request in the log ``llmos net log`` prints."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import net_agents
import pytest
from click.testing import CliRunner

from llmos_kernel.cli import main
from syscalls import net, proc

BIG = 256 * 1024


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/hello":
            self._send(200, json.dumps({"hello": "world",
                                        "probe": self.headers.get("x-probe")}).encode())
        elif self.path == "/big":
            self._send(200, b"x" * BIG, "application/octet-stream")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, b"{}")
        elif self.path == "/inside":
            self._send(302, b"", headers={"location": "/hello"})
        elif self.path == "/outside":  # the same server under a name nobody allowed
            self._send(302, b"", headers={"location": f"http://localhost:{port}/hello"})
        else:
            self._send(404, b'{"error": "no such page"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(201, json.dumps({"got": body.decode()}).encode())


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # /slow writes to a client that gave up: expected, not news


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _run(kernel, spec_net, *urls, sandbox=False, **kw):
    async def go():
        results = []
        for url in urls:
            pid = await proc.spawn(net_agents.fetch, {"url": url, **kw}, net=spec_net,
                                   sandbox=sandbox)
            results.append((pid, (await proc.wait(pid, timeout=60))["result"]))
        return results
    return kernel.run(go())


def test_nothing_is_reachable_unless_allowed_at_spawn(kernel, server):
    (_, nothing), = _run(kernel, None, f"http://{server}/hello")
    (_, other_port), = _run(kernel, ["127.0.0.1:1"], f"http://{server}/hello")
    assert nothing["error"] == other_port["error"] == "PermissionDenied"
    assert "allowlist" in nothing["message"]
    with pytest.raises(Exception) as e:  # the test driver itself was allowed nothing
        kernel.run(net.fetch(f"http://{server}/hello"))
    assert type(e.value).__name__ == "PermissionDenied"


def test_an_allowed_host_answers_get_and_post(kernel, server):
    (_, got), (_, missing) = _run(kernel, [server], f"http://{server}/hello",
                                  f"http://{server}/nope")
    assert got["status"] == 200 and json.loads(got["text"]) == {"hello": "world",
                                                                 "probe": "llmos"}
    assert missing["status"] == 404  # an HTTP error is an answer, not an exception
    (_, posted), = _run(kernel, ["127.0.0.1"], f"http://{server}/echo", method="POST",
                        body="ping")
    assert posted["status"] == 201 and json.loads(posted["text"]) == {"got": "ping"}


def test_redirects_are_checked_at_every_hop(kernel, server):
    (_, inside), (_, outside) = _run(kernel, [server], f"http://{server}/inside",
                                     f"http://{server}/outside")
    assert inside["status"] == 200 and inside["url"] == f"http://{server}/hello"
    assert outside["error"] == "PermissionDenied" and "localhost" in outside["message"]


def test_size_and_time_limits(kernel, server):
    (_, big), (_, ok) = _run(kernel, [server], f"http://{server}/big",
                             f"http://{server}/hello", max_bytes=BIG // 2)
    (_, slow), = _run(kernel, [server], f"http://{server}/slow", timeout=0.5)
    assert big["error"] == "QuotaExceeded" and "max_bytes" in big["message"]
    assert ok["status"] == 200
    assert slow["error"] == "Timeout"


def test_a_child_reaches_no_further_than_its_parent(kernel, server):
    async def go():
        pid = await proc.spawn(net_agents.delegate,
                               {"net_hosts": [server, "example.com", "*.example.org"],
                                "urls": [f"http://{server}/hello", "http://example.com/"]},
                               net=[server])
        return (await proc.wait(pid, timeout=90))["result"]

    got = kernel.run(go())
    assert got["net"] == [server]
    assert got["results"][0]["status"] == 200
    assert got["results"][1]["error"] == "PermissionDenied"


def test_a_sandboxed_process_fetches_through_the_kernel(kernel, server):
    (_, got), = _run(kernel, [server], f"http://{server}/hello", sandbox=True)
    assert got["status"] == 200 and json.loads(got["text"])["hello"] == "world"


def test_every_request_is_in_the_log(kernel, server):
    """``llmos run --sandbox --net HOST`` allows the host; ``llmos net log`` shows the
    request and the redirect it took, and a refused one."""
    where = ["--kernel", kernel.name, "--state-dir", str(kernel.state_dir)]
    ran = CliRunner().invoke(main, ["run", f"{net_agents.__file__}:fetch", "--sandbox",
                                    "--net", server, "--arg", f"url=http://{server}/inside",
                                    *where])
    assert ran.exit_code == 0, ran.output
    pid = int(ran.stdout.split("\n", 1)[0])
    assert json.loads(ran.stdout.split("\n", 1)[1])["result"]["status"] == 200
    (refused_pid, _), = _run(kernel, None, f"http://{server}/hello")
    result = CliRunner().invoke(main, ["net", "log", "--json", "--limit", "500", *where])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    mine = [r for r in rows if r["pid"] == pid]
    assert [(r["outcome"], r["status"], r["redirects"]) for r in mine] == [
        ("ok", 200, [f"http://{server}/hello"])]
    assert [r["outcome"] for r in rows if r["pid"] == refused_pid] == ["refused"]
    text = CliRunner().invoke(main, ["net", "log", "--pid", str(pid), *where])
    assert text.exit_code == 0 and f"GET http://{server}/inside  200" in text.stdout
