"""MQTT over WebSocket from a real browser (issue 11): headless Chromium runs mqtt.js through
fastproxy's --websocket listener (ws and wss) to a Mosquitto that has only its TCP listener.

The page (tests/browser/roundtrip.html, served from 127.0.0.1 by a thread) subscribes, publishes,
and writes what happened into its DOM; a paho client on the broker's TCP port is the other side.
The browser is driven over the DevTools protocol on pipes (tests/browserutil.py: no extra
Python package, no debugging port). For wss Chromium trusts only the test server certificate,
pinned by its public key (--ignore-certificate-errors-spki-list), not every certificate.

Needs Chromium and the mqtt.js bundle: scripts/browser-deps installs both (skipped otherwise).
"""
from __future__ import annotations

import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

import browserutil as B
import proxyutil as U

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "browser"
EXAMPLE = U.REPO / "examples" / "web-dashboard"
WIDTH, HEIGHT = 800, 600

pytestmark = pytest.mark.skipif(B.missing_reason() is not None, reason=B.missing_reason() or "")


@pytest.fixture
def static_server():
    """Serves tests/browser/ and the cached mqtt.js bundle as /mqtt.min.js on 127.0.0.1."""
    servers: list[B.StaticServer] = []

    def start(directory: Path = PAGE_DIR) -> B.StaticServer:
        s = B.StaticServer(directory, {"/mqtt.min.js": B.MQTTJS_BUNDLE})
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def chromium():
    browsers: list[B.Chromium] = []

    def start(**kw) -> B.Chromium:
        b = B.Chromium(width=WIDTH, height=HEIGHT, **kw)
        browsers.append(b)
        return b

    yield start
    for b in browsers:
        b.close()


def _page_state(browser: B.Chromium) -> dict:
    """What the page wrote into its DOM: #state's text and #result's JSON."""
    return browser.evaluate(
        "({state: document.getElementById('state').textContent,"
        "  result: JSON.parse(document.getElementById('result').textContent || '{}')})")


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_browser_round_trip(scheme, mosquitto, start_proxy, certs, static_server, chromium, tmp_path):
    tls = scheme == "wss"
    web = static_server()
    # Only the page's own origin may open the WebSocket: the browser's Origin header must match.
    proxy = start_proxy(mosquitto, "--websocket", "--ws-origins", web.origin, tls=tls)
    flags = [f"--ignore-certificate-errors-spki-list={B.spki_sha256_b64(certs.server_cert)}"] if tls else []
    browser = chromium(extra_flags=flags)

    tag = uuid.uuid4().hex[:8]
    client_id = f"browser-{scheme}-{tag}"
    to_page, from_page = f"fastproxy/browser/{tag}/to-page", f"fastproxy/browser/{tag}/from-page"
    page_msg, paho_msg = f"hello from the browser {tag}", f"hello from paho {tag}"

    # The other side: a plain MQTT client on the broker's own TCP port (not through fastproxy).
    other = U.PahoClient(mosquitto.port, client_id=f"paho-{tag}")
    try:
        other.connect()
        other.subscribe(from_page, qos=1)

        query = urllib.parse.urlencode({"url": f"{scheme}://localhost:{proxy.port}/mqtt", "id": client_id,
                                        "sub": to_page, "pub": from_page, "msg": page_msg})
        browser.navigate(f"{web.origin}/roundtrip.html?{query}")
        assert "/mqtt.min.js" in web.requests, web.requests

        # Publish to the page only once its subscription is in place (no retained messages).
        browser.wait_for("JSON.parse(document.getElementById('result').textContent || '{}').subscribed"
                         " || document.body.dataset.state === 'failed'", timeout=20,
                         what="the page's SUBACK")
        st = _page_state(browser)
        assert st["result"]["error"] is None, (st, browser.diag(), proxy.stderr()[-2000:])
        assert st["result"]["connected"] is True, st
        other.publish(to_page, paho_msg.encode(), qos=0)  # QoS 0: see roundtrip.html

        browser.wait_for("['done', 'failed'].includes(document.body.dataset.state)", timeout=20,
                         what="the page's round trip")
        st = _page_state(browser)
        assert st["state"] == "done", (st, browser.diag(), proxy.stderr()[-2000:])
        assert st["result"] == {"connected": True, "subscribed": True, "sent": page_msg,
                                "received": paho_msg, "error": None}, st

        got = other.collect(1, timeout=10)
        assert [m.payload.decode() for m in got] == [page_msg]
        assert got[0].topic == from_page

        # The screenshot: a PNG of the window's size whose big status block is green.
        shot = tmp_path / f"browser-{scheme}.png"
        data = browser.screenshot(shot)
        assert shot.is_file() and shot.stat().st_size == len(data) > 0
        png = B.png_decode(data)
        assert png[:2] == (WIDTH, HEIGHT), png[:3]
        for x, y in ((WIDTH // 2, 200), (20, 20), (WIDTH - 20, 380)):
            r, g, b = B.png_pixel(png, x, y)
            assert g > 120 and r < 60 and b < 60, f"pixel ({x},{y}) is {(r, g, b)}, not green; see {shot}"
        r, g, b = B.png_pixel(png, WIDTH // 2, HEIGHT - 20)  # below the block: not green
        assert not (g > 120 and r < 60 and b < 60), (r, g, b)
    finally:
        other.close()

    # fastproxy logged the browser's session under the page's ClientId, ended by its DISCONNECT.
    entries = proxy.wait_access(lambda e: e.clientid == client_id, timeout=10)
    assert len(entries) == 1, [e.raw for e in entries]
    e = entries[0]
    broker_lines = [ln for ln in mosquitto.log().splitlines() if client_id in ln]
    assert e.status == 200 and e.reason == "ok", "\n".join([e.raw, *broker_lines, proxy.stderr()[-1500:]])
    assert e.remote.startswith("127.0.0.1"), e.raw
    assert e.protocol.startswith("TLS") if tls else e.protocol == "TCP", e.raw
    assert e.received > 0 and e.sent > 0, e.raw
    # The broker saw the browser's CONNECT as plain MQTT under the same ClientId.
    assert client_id in U.broker_client_ids(mosquitto.log())


@pytest.mark.parametrize("case", ["untrusted-certificate", "foreign-origin"])
def test_browser_refused(case, mosquitto, start_proxy, static_server, chromium):
    """The other half of the two checks the round trip relies on: without the certificate pin
    Chromium refuses the test CA's certificate (so the wss case proves the pin, not a blanket
    --ignore-certificate-errors), and a page whose origin is not in --ws-origins is refused."""
    web = static_server()
    if case == "untrusted-certificate":
        proxy = start_proxy(mosquitto, "--websocket", tls=True)
        url = f"wss://localhost:{proxy.port}/mqtt"
    else:
        proxy = start_proxy(mosquitto, "--websocket", "--ws-origins", "https://app.example.com", tls=False)
        url = f"ws://localhost:{proxy.port}/mqtt"
    browser = chromium()
    client_id = f"browser-refused-{uuid.uuid4().hex[:8]}"
    query = urllib.parse.urlencode({"url": url, "id": client_id, "sub": "fastproxy/browser/refused",
                                    "pub": "fastproxy/browser/refused", "msg": "must not arrive"})
    browser.navigate(f"{web.origin}/roundtrip.html?{query}")
    browser.wait_for("document.body.dataset.state === 'failed'", timeout=20, what="the page to fail")
    st = _page_state(browser)
    assert st["result"]["connected"] is False, st
    # fastproxy refused the session before any MQTT reached the broker.
    entries = proxy.wait_access(lambda e: e.status >= 400, timeout=10)
    assert all(e.clientid in ("-", "") for e in entries), [e.raw for e in entries]
    if case == "untrusted-certificate":
        assert entries[0].status == 400 and entries[0].reason.startswith("tls-handshake"), entries[0].raw
    else:
        assert entries[0].status == 403, entries[0].raw
    assert client_id not in mosquitto.log()
    assert U.broker_client_ids(mosquitto.log()) == []  # (the fixture's readiness probe is a bare connection)


@pytest.fixture
def example_procs(tmp_path):
    """Runs examples/web-dashboard's scripts as subprocesses; stops them at teardown."""
    procs: list[subprocess.Popen] = []

    def start(script: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{script}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen([sys.executable, str(EXAMPLE / script), *args], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, cwd=str(EXAMPLE))
        procs.append(p)
        return p, log

    yield start
    for p in procs:
        U.stop_process(p, timeout=5)


def test_web_dashboard_example(mosquitto, start_proxy, chromium, example_procs, tmp_path):
    """examples/web-dashboard: its sensor publishes to the broker, its static server serves the
    page, the page (in Chromium) shows live readings through fastproxy's WebSocket listener."""
    web_port = U.free_port()
    origin = f"http://127.0.0.1:{web_port}"
    proxy = start_proxy(mosquitto, "--websocket", "/mqtt", "--ws-origins", origin, tls=False)
    server, server_log = example_procs("serve.py", "--port", str(web_port), "--bundle", str(B.MQTTJS_BUNDLE),
                                       "--quiet")
    U.wait_port(U.HOST, web_port, timeout=10, proc=server, connect=False, diag=server_log.read_text)
    sensor, sensor_log = example_procs("sensor.py", "--port", str(mosquitto.port), "--sensors", "3",
                                       "--interval", "0.2", "--count", "300", "--seed", "7")

    browser = chromium()
    browser.navigate(f"{origin}/?ws=ws://127.0.0.1:{proxy.port}/mqtt")
    diag = lambda: f"{browser.diag()}\nsensor.py:\n{sensor_log.read_text()}"  # noqa: E731
    browser.wait_for("document.body.dataset.conn === 'online'", timeout=15, what="the dashboard to connect")
    browser.wait_for("Number(document.body.dataset.readings || 0) >= 9"
                     " && document.querySelectorAll('[data-sensor]').length === 3",
                     timeout=15, what="readings from all three sensors")
    first = browser.evaluate("Number(document.body.dataset.readings)")
    cards = browser.evaluate(
        "[...document.querySelectorAll('[data-sensor]')].map(c => ({id: c.dataset.sensor,"
        " t: Number(c.dataset.temperature), h: Number(c.dataset.humidity), seq: Number(c.dataset.seq),"
        " shown: c.querySelector('.t').textContent}))")
    assert [c["id"] for c in cards] == ["sensor-01", "sensor-02", "sensor-03"], cards
    for c in cards:
        assert 15.0 <= c["t"] <= 30.0 and 30.0 <= c["h"] <= 70.0 and c["seq"] >= 1, (c, diag())
        # the page shows toFixed(1) (22.25 -> "22.3"; Python's format rounds half to even)
        assert abs(float(c["shown"]) - c["t"]) <= 0.05 + 1e-9, c
    # Live: more readings keep arriving.
    browser.wait_for(f"Number(document.body.dataset.readings) >= {first + 6}", timeout=10,
                     what="further readings")
    assert sensor.poll() is None, diag()

    shot = tmp_path / "web-dashboard.png"
    png = B.png_decode(browser.screenshot(shot))
    assert png[:2] == (WIDTH, HEIGHT)
    print(f"dashboard screenshot: {shot}")

    browser.evaluate("window.dashboardClient.end(); true")
    entries = proxy.wait_access(lambda e: e.clientid.startswith("dashboard-"), timeout=10)
    assert entries[0].status == 200 and entries[0].protocol == "TCP", entries[0].raw
