// examples/web-dashboard: the browser is an MQTT client (mqtt.js) over WebSocket to fastproxy,
// which hands plain MQTT to the broker. Each sensor gets a card with its latest reading and a
// sparkline of its last temperatures. State is also in the DOM (data-* attributes) for tests.
(function () {
  "use strict";
  const q = new URLSearchParams(location.search);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = q.get("ws") || `${scheme}://${location.hostname}:8083/mqtt`;
  const topic = q.get("topic") || "sensors/+/reading";
  const HISTORY = 40;
  const $ = (id) => document.getElementById(id);
  const cards = new Map();  // sensor id -> {el, history}
  let count = 0;

  $("endpoint").textContent = url;
  $("topic").textContent = topic;

  function setConn(state, text) {
    const el = $("conn");
    el.className = state;
    el.textContent = text;
    document.body.dataset.conn = state;
  }

  function card(id) {
    let c = cards.get(id);
    if (c) return c;
    const el = document.createElement("div");
    el.className = "card";
    el.dataset.sensor = id;
    el.innerHTML = '<h2></h2><div class="temp"><span class="t">–</span><small> °C</small></div>' +
      '<div class="hum"><span class="h">–</span><small> % rH</small></div>' +
      '<svg class="spark" viewBox="0 0 100 40" preserveAspectRatio="none"><polyline points=""/></svg>' +
      '<div class="meta"></div>';
    el.querySelector("h2").textContent = id;
    // Cards stay in sensor order, whatever order the first readings arrive in.
    const after = [...$("sensors").children].find((x) => x.dataset.sensor > id);
    $("sensors").insertBefore(el, after || null);
    c = { el, history: [] };
    cards.set(id, c);
    $("empty").hidden = true;
    return c;
  }

  function spark(c) {
    const h = c.history;
    const lo = Math.min(...h) - 0.2, hi = Math.max(...h) + 0.2;
    const pts = h.map((v, i) => {
      const x = h.length > 1 ? (i * 100) / (HISTORY - 1) : 0;
      const y = 38 - ((v - lo) / (hi - lo)) * 36;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    c.el.querySelector("polyline").setAttribute("points", pts.join(" "));
  }

  function show(r, topicName) {
    const id = String(r.sensor || topicName.split("/")[1] || "?");
    const c = card(id);
    const t = Number(r.temperature), hum = Number(r.humidity);
    c.el.querySelector(".t").textContent = Number.isFinite(t) ? t.toFixed(1) : "–";
    c.el.querySelector(".h").textContent = Number.isFinite(hum) ? hum.toFixed(0) : "–";
    const when = r.ts ? new Date(r.ts * 1000).toLocaleTimeString() : new Date().toLocaleTimeString();
    c.el.querySelector(".meta").textContent = `#${r.seq ?? "?"} at ${when}`;
    c.el.dataset.temperature = String(t);
    c.el.dataset.humidity = String(hum);
    c.el.dataset.seq = String(r.seq ?? "");
    if (Number.isFinite(t)) {
      c.history.push(t);
      if (c.history.length > HISTORY) c.history.shift();
      spark(c);
    }
    count += 1;
    $("count").textContent = String(count);
    document.body.dataset.readings = String(count);
  }

  if (typeof mqtt === "undefined") {
    setConn("offline", "mqtt.js missing (run scripts/browser-deps)");
    return;
  }
  const client = mqtt.connect(url, {
    clientId: "dashboard-" + Math.random().toString(16).slice(2, 10),
    protocolVersion: 4, clean: true, keepalive: 30, reconnectPeriod: 2000, connectTimeout: 10000,
  });
  client.on("connect", () => {
    setConn("online", "connected");
    client.subscribe(topic, { qos: 0 }, (err) => { if (err) setConn("offline", "subscribe failed: " + err.message); });
  });
  client.on("reconnect", () => setConn("", "reconnecting…"));
  client.on("offline", () => setConn("offline", "offline"));
  client.on("error", (e) => setConn("offline", "error: " + (e && e.message || e)));
  client.on("message", (topicName, payload) => {
    let r;
    try { r = JSON.parse(payload.toString()); } catch (e) { return; }  // not a reading: ignored
    if (r && typeof r === "object") show(r, topicName);
  });
  window.dashboardClient = client;
})();
