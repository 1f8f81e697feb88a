"""``llmos serve``'s web console and ``/metrics``, checked in a real headless browser.

The browser is Debian's chromium driven by Selenium through the chromedriver built from
the same chromium source (package ``chromium-driver``), so browser and driver always
match and nothing is downloaded but Debian packages; the ``chromium`` fixture installs
them when they are missing. The server runs in this process in front of the session's
kernel (real model) with one API key, which the page is given through its key field, as
a person would. What the page shows is compared with the kernel's own answers.

The first tests need no kernel: a stand-in gateway shows that a scrape survives a
failing kernel and that a keyless server serves the page but not its data to a caller
that is not on the loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from llmos_kernel.errors import LlmosError
from llmos_kernel.http.app import Server, create_app
from llmos_kernel.http.gateway import Gateway, KeyState
from llmos_kernel.http.keys import ApiKey, KeyRing
from syscalls import proc

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "console-key-0123456789"
WAIT_S = 60.0
SCREENSHOT = os.environ.get("LLMOS_CONSOLE_SCREENSHOT")  # also save the picture here


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- no kernel: a stand-in gateway ----------------------------------------------------


class FailingGateway:
    """A gateway whose kernel calls all fail, with one key that has served requests."""

    def __init__(self):
        self.keys = {"k": KeyState(ApiKey("k"), runtime=None, requests=3, tokens_in=30,
                                   tokens_out=12)}

    async def call(self, method: str, *args):
        raise ConnectionError("the kernel is gone")


def _app(keys: dict[str, ApiKey]) -> TestClient:
    server = Server(FailingGateway(), KeyRing(keys), "m", ["m"], "e")
    return TestClient(create_app(server))


def test_a_scrape_answers_when_the_kernel_fails():
    reply = _app({KEY: ApiKey("k")}).get("/metrics", headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200
    got = samples(reply.text)
    assert got[("llmos_up", ())] == 0
    assert got[("llmos_http_requests_total", (("key", "k"),))] == 3
    assert got[("llmos_http_completion_tokens_total", (("key", "k"),))] == 12
    assert not any(name.startswith("llmos_kv_") for name, _ in got)


def test_metrics_and_console_data_follow_the_servers_auth():
    with_keys, keyless = _app({KEY: ApiKey("k")}), _app({})  # TestClient is not loopback
    assert with_keys.get("/metrics").status_code == 401
    assert with_keys.get("/api/console/ps").status_code == 401
    assert keyless.get("/metrics").status_code == 403
    assert keyless.get("/api/console/status").status_code == 403
    page = keyless.get("/")
    assert page.status_code == 200 and "console.js" in page.text
    assert keyless.get("/console/console.js").status_code == 200
    assert keyless.get("/console/..%2Fconsole.py").status_code == 404


def test_a_cross_site_request_may_not_act():
    reply = _app({KEY: ApiKey("k")}).post(
        "/api/console/kill/5", json={"signal": "term"},
        headers={"authorization": f"Bearer {KEY}", "origin": "http://elsewhere.example"})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "cross_origin"


# -- the real kernel, in the browser --------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium and its chromedriver, installed with apt-get when missing (CI
    runs as root on a clean machine that reaches Debian's archive)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if shutil.which("apt-get") is None:
            pytest.fail("these tests need /usr/bin/chromium and /usr/bin/chromedriver; "
                        "install Debian's chromium and chromium-driver", pytrace=False)
        done = subprocess.run(
            "apt-get update -q && apt-get install -y -q chromium chromium-driver", shell=True,
            check=False, capture_output=True, text=True, timeout=1200,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.fail("could not install chromium and chromium-driver with apt-get "
                        f"(exit {done.returncode}); run it as root:\n{done.stderr[-3000:]}",
                        pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def server(kernel):
    from llmos_kernel.client import KernelClient
    from llmos_kernel.http.run import start_in_thread

    token = (kernel.state_dir / "root.token").read_text()
    running = start_in_thread(Gateway(KernelClient(kernel.handle, token)),
                              KeyRing({KEY: ApiKey("console")}), max_tokens=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(chromium, server):
    """The console open in headless chromium, given the key through its key field."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(server.url + "/")
        banner = wait(driver, lambda d: d.find_element("id", "banner").text)
        assert "API key" in banner  # the first polls are refused: no key yet
        field = driver.find_element("id", "api-key")
        field.send_keys(KEY, Keys.TAB)
        wait(driver, lambda d: not d.find_element("id", "banner").text
             and "kernel " in d.find_element("id", "kernel-name").text)
        driver.refresh()  # the key is kept in localStorage
        wait(driver, lambda d: d.find_elements("css selector", "#processes tbody tr"))
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def click(driver, css: str) -> None:
    """Click what ``css`` finds, again if a redraw replaced it under the pointer."""
    def attempt(d) -> bool:
        d.find_element("css selector", css).click()
        return True

    wait(driver, attempt)


def row(driver, pid: int):
    return driver.find_element("css selector", f'#processes tr[data-pid="{pid}"]')


def children_of(kernel, pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        kids = [p["pid"] for p in kernel.call("ps", False) if p["parent"] == pid]
        if len(kids) == count:
            return sorted(kids)
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not start {count} children")


def spawn_tree(kernel, name: str) -> tuple[int, list[int]]:
    parent = kernel.run(proc.spawn("workers:supervise", {"children": [
        {"program": "workers:idle", "name": f"{name}-{i}"} for i in range(2)]}, name=name))
    return parent, children_of(kernel, parent, 2)


def test_the_page_shows_the_process_tree_and_kills_from_it(browser, kernel):
    parent, kids = spawn_tree(kernel, "console-tree")
    wait(browser, lambda d: all(row(d, pid).get_attribute("data-status") == "running"
                                for pid in [parent, *kids]))
    order = [int(r.get_attribute("data-pid"))
             for r in browser.find_elements("css selector", "#processes tbody tr")]
    assert order.index(kernel.pid) < order.index(parent) < order.index(kids[0])
    names = {pid: row(browser, pid).find_element("css selector", ".name").text
             for pid in [parent, *kids]}
    assert names[parent].endswith("console-tree") and "─" in names[parent]
    assert names[kids[-1]].endswith("└─ console-tree-1")
    assert row(browser, parent).find_element("css selector", "code").text == "workers:supervise"

    click(browser, f'#processes tr[data-pid="{parent}"] button[data-action="kill"]')
    assert kernel.call("wait", parent, 30)["reason"] == "killed"
    wait(browser, lambda d: not d.find_elements(
        "css selector", ",".join(f'#processes tr[data-pid="{p}"]' for p in [parent, *kids])))


def test_the_memory_map_shows_the_kernels_numbers(browser, kernel):
    def shown(path: str) -> float:
        return float(browser.find_element(
            "css selector", f'[data-stat="{path}"]').get_attribute("data-value"))

    memory = kernel.call("status")["memory"]
    wait(browser, lambda d: shown("memory.num_blocks") == memory["num_blocks"])
    for key in ("num_blocks", "kv_pool_bytes", "weight_bytes", "block_size", "swap_blocks"):
        assert shown(f"memory.{key}") == memory[key], key
    assert shown("memory.kv_blocks_used") + shown("memory.kv_blocks_free") == memory["num_blocks"]
    text = browser.find_element("css selector", '[data-stat="memory.num_blocks"]').text
    assert text == f"{memory['num_blocks']:,}"
    devices = [d.get_attribute("data-device")
               for d in browser.find_elements("css selector", "#memory .device")]
    assert devices == [d["name"] for d in memory["devices"]]
    queues = kernel.call("status")["queues"]
    for name in ("running", "waiting", "swapped", "parked"):
        wait(browser, lambda d, n=name: shown(f"queues.{n}") == queues[n])


def test_approving_and_denying_from_the_page(browser, kernel):
    go, keep = (kernel.run(proc.spawn("workers:delete_after_approval",
                                      {"path": f"console-{name}.txt"}, name=f"console-{name}"))
                for name in ("go", "keep"))
    for pid in (go, keep):
        wait(browser, lambda d, p=pid: d.find_elements(
            "css selector", f'#approvals tr[data-pid="{p}"][data-tool="delete_file"]'))
    assert browser.find_element("css selector", f'#approvals tr[data-pid="{go}"] .args').text \
        == '{"path":"console-go.txt"}'
    live = {p["pid"]: p["status"] for p in kernel.call("ps", False)}
    assert live[go] == live[keep] == "running"  # both wait for a decision
    click(browser, f'#approvals tr[data-pid="{go}"] button[data-action="approve"]')
    # As a person would, look before the next click: the decided row leaves the table and
    # the rows below it move up, so a click aimed while it leaves can land on nothing.
    wait(browser, lambda d: not d.find_elements(
        "css selector", f'#approvals tr[data-pid="{go}"]'))
    click(browser, f'#approvals tr[data-pid="{keep}"] button[data-action="deny"]')
    approved, denied = kernel.call("wait", go, 60), kernel.call("wait", keep, 60)
    assert approved["result"] == "deleted console-go.txt"
    assert denied["error"]["type"] == "PermissionDenied"
    wait(browser, lambda d: not d.find_elements("css selector", "#approvals tbody tr"))


def test_the_log_pane_tails_a_process_as_it_prints(browser, kernel):
    lines = ["first line", "second line", "third line", "last line"]
    pid = kernel.run(proc.spawn("hello:main", {"lines": lines, "pause": 0.7},
                                name="console-printer"))
    click(browser, f'#processes tr[data-pid="{pid}"]')
    log = browser.find_element("id", "log")
    wait(browser, lambda d: "first line" in log.text)
    wait(browser, lambda d: log.text.splitlines()[-1:] == ["last line"])
    assert log.text.splitlines() == lines  # each line once: later polls read from the offset
    assert kernel.call("wait", pid, 30)["result"] == {"printed": 4}
    wait(browser, lambda d: d.find_element("id", "log-pid").get_attribute("textContent")
         == f"— pid {pid} (exited)")


def test_metrics_expose_the_kernels_gauges_and_count_requests(server, kernel):
    def scrape() -> dict:
        reply = httpx.get(f"{server.url}/metrics", headers=auth, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/plain")
        return samples(reply.text)

    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 401
    memory = kernel.call("status")["memory"]
    before = scrape()
    assert before[("llmos_up", ())] == 1
    for name, key in (("llmos_kv_blocks_capacity", "num_blocks"),
                      ("llmos_kv_pool_bytes", "kv_pool_bytes"),
                      ("llmos_weight_bytes", "weight_bytes"),
                      ("llmos_swap_blocks_capacity", "swap_blocks")):
        assert before[(name, ())] == memory[key], name
    assert before[("llmos_kv_blocks_used", ())] + before[("llmos_kv_blocks_free", ())] \
        == memory["num_blocks"]

    reply = httpx.post(f"{server.url}/v1/chat/completions", headers=auth, timeout=120, json={
        "model": server.server.model_id, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}]})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    after = scrape()
    key = (("key", "console"),)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    assert moved("llmos_http_requests_total", key) == 1
    console = httpx.get(f"{server.url}/api/console/status", headers=auth, timeout=30).json()
    assert console["http_keys"]["console"]["requests"] == after[("llmos_http_requests_total", key)]
    assert moved("llmos_http_prompt_tokens_total", key) == usage["prompt_tokens"]
    assert moved("llmos_http_completion_tokens_total", key) == usage["completion_tokens"]
    assert moved("llmos_engine_tokens_generated_total") >= usage["completion_tokens"]
    assert moved("llmos_time_to_first_token_seconds_count") >= 1
    assert after[("llmos_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] \
        == after[("llmos_time_to_first_token_seconds_count", ())]
    pid = str(server.server.gateway.keys["console"].runtime.pid)
    assert after[("llmos_process_tokens_total", (("name", "http:console"), ("pid", pid)))] > 0


def test_a_screenshot_of_the_console(browser, kernel, server, tmp_path):
    parent, _ = spawn_tree(kernel, "researcher")
    waiting = kernel.run(proc.spawn("workers:delete_after_approval", {"path": "draft.txt"},
                                    name="cleaner"))
    printer = kernel.run(proc.spawn("hello:main", {"lines": [
        f"step {i}: thinking about the draft" for i in range(60)], "pause": 0.5},
        name="writer"))
    stop = threading.Event()

    def traffic() -> None:  # some tokens, so the throughput shows
        while not stop.is_set():
            httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                       headers={"authorization": f"Bearer {KEY}"}, json={
                           "model": server.server.model_id, "max_tokens": 24,
                           "messages": [{"role": "user", "content": "Tell me a story."}]})

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        wait(browser, lambda d: d.find_elements("css selector",
                                                f'#approvals tr[data-pid="{waiting}"]'))
        click(browser, f'#processes tr[data-pid="{printer}"]')
        wait(browser, lambda d: "step 8" in d.find_element("id", "log").text)
        wait(browser, lambda d: float(d.find_element("id", "live").get_attribute(
            "data-value") or 0) > 0)
        browser.set_window_size(1400, browser.execute_script(  # the whole page, no scrolling
            "return document.querySelector('main').getBoundingClientRect().bottom"
            " + window.outerHeight - window.innerHeight"))
        picture = tmp_path / "console.png"
        assert browser.save_screenshot(str(picture))
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT:
            shutil.copyfile(picture, SCREENSHOT)
    finally:
        stop.set()
        worker.join(120)
        browser.set_window_size(1400, 1000)
        for approval in kernel.call("approvals"):
            if approval["pid"] == waiting:
                kernel.call("decide", approval["id"], False)
        for pid in (parent, printer):
            with contextlib.suppress(LlmosError):  # the printer may have finished
                kernel.call("kill", pid)
