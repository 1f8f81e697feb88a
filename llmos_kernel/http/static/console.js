// The llmos console: polls /api/console/* once a second and redraws what changed.
// Plain DOM, no framework and nothing loaded from elsewhere. Text that agents control
// (names, arguments, logs) only ever enters the page as textContent, never as HTML.
"use strict";

(() => {
  const KEY = "llmos.apiKey";
  const POLL_MS = 1000;
  const LOG_CHARS = 200000; // what the log pane keeps
  const CHART_POINTS = 60;
  const $ = (selector) => document.querySelector(selector);
  const state = { showExited: false, selected: null, logOffset: null, logPick: 0, rates: [], last: {}, polls: 0 };

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const int = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i ? n.toFixed(n < 10 ? 2 : 1) : n} ${units[i]}`;
  }

  // A number the page shows, tagged with where it comes from in the status and its raw value.
  const stat = (path, value, text) => h("span", { dataset: { stat: path, value: value ?? "" } },
    text ?? int(value));

  // -- talking to the server ----------------------------------------------------------
  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    const key = localStorage.getItem(KEY);
    if (key) headers.authorization = `Bearer ${key}`;
    const reply = await fetch(path, { ...options, headers, cache: "no-store" });
    const body = await reply.json().catch(() => ({}));
    if (!reply.ok) {
      const message = (body.error && body.error.message) || `${reply.status} ${reply.statusText}`;
      const error = new Error(reply.status === 401 ? `${message} (enter it at the top right)` : message);
      error.status = reply.status;
      throw error;
    }
    return body;
  }

  const post = (path, body) => api(path, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });

  function banner(message) {
    const node = $("#banner");
    node.hidden = !message;
    node.textContent = message || "";
  }

  // Redraw a part only when its data changed, so buttons stay put between polls.
  function changed(part, data) {
    const text = JSON.stringify(data);
    if (state.last[part] === text) return false;
    state.last[part] = text;
    return true;
  }

  // -- processes ----------------------------------------------------------------------
  function treeOrder(procs) {
    const byPid = new Map(procs.map((p) => [p.pid, p]));
    const children = new Map();
    const roots = [];
    for (const p of procs) {
      if (p.parent !== null && p.parent !== p.pid && byPid.has(p.parent)) {
        if (!children.has(p.parent)) children.set(p.parent, []);
        children.get(p.parent).push(p);
      } else {
        roots.push(p);
      }
    }
    const rows = [];
    const seen = new Set();
    const walk = (p, prefix, branch) => {
      if (seen.has(p.pid)) return;
      seen.add(p.pid);
      rows.push({ proc: p, tree: prefix + branch });
      const kids = (children.get(p.pid) || []).sort((a, b) => a.pid - b.pid);
      const under = prefix + (branch === "└─ " ? "   " : branch === "├─ " ? "│  " : "");
      kids.forEach((kid, i) => walk(kid, under, i === kids.length - 1 ? "└─ " : "├─ "));
    };
    roots.sort((a, b) => a.pid - b.pid).forEach((p) => walk(p, "", ""));
    return rows;
  }

  function renderProcesses(procs) {
    if (!changed("ps", [procs, state.selected])) return;
    const body = $("#processes tbody");
    body.replaceChildren(...treeOrder(procs).map(({ proc: p, tree }) => {
      const exited = p.status === "exited";
      const reason = exited && p.exit ? ` (${p.exit.reason || "?"})` : "";
      return h("tr", { dataset: { pid: p.pid, status: p.status }, class: p.pid === state.selected ? "selected" : null },
        h("td", {}, p.pid),
        h("td", { class: "name" }, h("span", { class: "tree" }, tree), p.name || ""),
        h("td", {}, h("span", { class: `state state-${p.status}` }, p.status + reason)),
        h("td", {}, p.priority),
        h("td", { class: "tokens" }, int(p.tokens_used)),
        h("td", { class: "mailbox" }, p.mailbox ?? ""),
        h("td", {}, p.restarts),
        h("td", {}, h("code", {}, p.program)),
        h("td", { class: "muted" }, p.host || ""),
        h("td", {}, exited ? null : h("button", { class: "kill", dataset: { action: "kill", pid: p.pid } }, "Kill")));
    }));
  }

  $("#processes tbody").addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action=kill]");
    if (button) {
      button.disabled = true;
      try {
        await post(`/api/console/kill/${button.dataset.pid}`, { signal: "term" });
        poll();
      } catch (error) {
        banner(`kill ${button.dataset.pid}: ${error.message}`);
        button.disabled = false;
      }
      return;
    }
    const row = event.target.closest("tr[data-pid]");
    if (row) selectLog(Number(row.dataset.pid));
  });

  // -- memory -------------------------------------------------------------------------
  function segment(cls, part, whole, title) {
    const width = whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0;
    return h("span", { class: cls, style: `width:${width.toFixed(3)}%`, title });
  }

  function isPlanDevice(device, memory) {
    return device.name === memory.device || (memory.device === "cuda" && device.name === "cuda:0");
  }

  function renderMemory(m) {
    if (!changed("memory", m)) return;
    const devices = (m.devices || []).map((d) => {
      const onIt = isPlanDevice(d, m);
      const inUse = d.total_bytes - d.free_bytes;
      const bar = onIt
        ? [segment("seg-weights", m.weight_bytes, d.total_bytes, `weights ${bytes(m.weight_bytes)}`),
          segment("seg-used", m.kv_bytes_used, d.total_bytes, `KV used ${bytes(m.kv_bytes_used)}`),
          segment("seg-kvfree", m.kv_pool_bytes - m.kv_bytes_used, d.total_bytes,
            `KV free ${bytes(m.kv_pool_bytes - m.kv_bytes_used)}`),
          segment("seg-other", Math.max(0, inUse - m.weight_bytes - m.kv_pool_bytes), d.total_bytes,
            "other memory in use")]
        : [segment("seg-other", inUse, d.total_bytes, `in use ${bytes(inUse)}`)];
      return h("div", { class: "device", dataset: { device: d.name } },
        h("div", {}, h("span", { class: "device-name" }, d.name), " ",
          h("span", { class: "muted" }, `${bytes(d.free_bytes)} free of ${bytes(d.total_bytes)}`,
            onIt ? ` · model and KV pool (${m.dtype})` : "")),
        h("div", { class: "bar" }, bar));
    });
    const pool = m.num_blocks || 0;
    const kvBar = h("div", { class: "bar" },
      segment("seg-used", m.kv_blocks_used, pool, `${m.kv_blocks_used} blocks used`),
      segment("seg-kvfree", m.kv_blocks_free, pool, `${m.kv_blocks_free} blocks free`));
    const cachedBar = h("div", { class: "bar", style: "height:6px" },
      segment("seg-cached", m.kv_blocks_cached, pool, `${m.kv_blocks_cached} blocks cached`));
    $("#memory").replaceChildren(
      ...devices,
      h("div", { class: "legend" },
        h("span", {}, h("i", { class: "seg-weights" }), "weights"),
        h("span", {}, h("i", { class: "seg-used" }), "KV used"),
        h("span", {}, h("i", { class: "seg-kvfree" }), "KV free"),
        h("span", {}, h("i", { class: "seg-cached" }), "KV cached"),
        h("span", {}, h("i", { class: "seg-other" }), "other")),
      h("div", { class: "device-name" }, "KV pool blocks"), kvBar, cachedBar,
      h("dl", {},
        h("dt", {}, "weights"), h("dd", {}, stat("memory.weight_bytes", m.weight_bytes, bytes(m.weight_bytes))),
        h("dt", {}, "KV pool"), h("dd", {}, stat("memory.kv_pool_bytes", m.kv_pool_bytes, bytes(m.kv_pool_bytes)),
          " in ", stat("memory.num_blocks", m.num_blocks), " blocks of ",
          stat("memory.block_size", m.block_size), " tokens"),
        h("dt", {}, "KV used"), h("dd", {}, stat("memory.kv_bytes_used", m.kv_bytes_used, bytes(m.kv_bytes_used)),
          " · ", stat("memory.kv_blocks_used", m.kv_blocks_used), " blocks"),
        h("dt", {}, "KV free"), h("dd", {}, stat("memory.kv_blocks_free", m.kv_blocks_free), " blocks"),
        h("dt", {}, "KV cached"), h("dd", {}, stat("memory.kv_blocks_cached", m.kv_blocks_cached),
          " blocks kept for prefix reuse"),
        h("dt", {}, "swap"), h("dd", {}, stat("memory.swap_blocks_used", m.swap_blocks_used), " / ",
          stat("memory.swap_blocks", m.swap_blocks), " blocks")));
  }

  // -- scheduler ----------------------------------------------------------------------
  function renderScheduler(s) {
    const rate = s.throughput_tok_s || 0;
    state.rates.push(rate);
    if (state.rates.length > CHART_POINTS) state.rates.shift();
    drawChart();
    const live = $("#live");
    live.dataset.value = rate;
    live.textContent = `${rate.toFixed(1)} tok/s`;
    const view = { queues: s.queues, preemptions: s.preemptions, prefix: s.prefix_cache, rate,
      step: s.step_p50_s, engine: s.engine, latency: s.latency && s.latency.totals, ipc: s.ipc,
      keys: s.http_keys };
    if (!changed("scheduler", view)) return;
    const q = s.queues || {};
    const latency = s.latency || { sums: {}, totals: {} };
    const mean = (k) => (latency.totals[k] ? `${(1000 * latency.sums[k] / latency.totals[k]).toFixed(1)} ms` : "–");
    const engine = s.engine || {};
    const ipc = s.ipc || {};
    $("#scheduler").replaceChildren(
      h("div", { class: "queues" }, ...["running", "waiting", "swapped", "parked"].map((name) =>
        h("div", { class: "queue" }, h("b", {}, stat(`queues.${name}`, q[name])), h("span", {}, name)))),
      h("dl", {},
        h("dt", {}, "throughput"), h("dd", {}, stat("throughput_tok_s", rate, `${rate.toFixed(1)} tok/s`),
          " over 10 s"),
        h("dt", {}, "step p50"), h("dd", {}, s.step_p50_s ? `${(1000 * s.step_p50_s).toFixed(1)} ms` : "–"),
        h("dt", {}, "preemptions"), h("dd", {}, Object.entries(s.preemptions || {})
          .map(([kind, n]) => `${kind} ${n}`).join(" · ") || "–"),
        h("dt", {}, "prefix cache"), h("dd", {}, s.prefix_cache
          ? `${(100 * s.prefix_cache.hit_rate).toFixed(1)}% of ${int(s.prefix_cache.query_tokens)} tokens` : "–"),
        h("dt", {}, "engine"), h("dd", {}, `${int(engine.steps)} steps · `,
          stat("engine.tokens_generated", engine.tokens_generated), " generated · ",
          int(engine.tokens_computed), " computed"),
        h("dt", {}, "latency"), h("dd", {}, `TTFT ${mean("ttft")} · per token ${mean("itl")} (means)`),
        h("dt", {}, "messages"), h("dd", {}, `${int(ipc.sent)} sent · ${int(ipc.delivered)} delivered · `
          + `${int(ipc.dead)} dead · ${int(ipc.pending)} pending`),
        ...Object.entries(s.http_keys || {}).flatMap(([name, k]) => [
          h("dt", {}, `key ${name}`),
          h("dd", { dataset: { key: name } }, `${int(k.requests)} requests · ${int(k.in_flight)} in flight · `
            + `${int(k.tokens_in)} in / ${int(k.tokens_out)} out`)])));
  }

  function drawChart() {
    const canvas = $("#throughput-chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const g = canvas.getContext("2d");
    g.scale(ratio, ratio);
    g.clearRect(0, 0, width, height);
    const top = Math.max(1, ...state.rates) * 1.15;
    const step = width / (CHART_POINTS - 1);
    const x0 = width - step * (state.rates.length - 1);
    const y = (v) => height - 2 - (v / top) * (height - 14);
    g.beginPath();
    g.moveTo(x0, height);
    state.rates.forEach((v, i) => g.lineTo(x0 + i * step, y(v)));
    g.lineTo(x0 + (state.rates.length - 1) * step, height);
    g.fillStyle = "rgba(59, 142, 208, 0.15)";
    g.fill();
    g.beginPath();
    state.rates.forEach((v, i) => (i ? g.lineTo(x0 + i * step, y(v)) : g.moveTo(x0, y(v))));
    g.strokeStyle = "#3b8ed0";
    g.lineWidth = 1.5;
    g.stroke();
    g.fillStyle = "#6b7385";
    g.font = "11px system-ui, sans-serif";
    g.fillText(`tok/s, last ${CHART_POINTS} s (peak ${Math.max(0, ...state.rates).toFixed(1)})`, 4, 11);
  }

  // -- approvals ----------------------------------------------------------------------
  function renderApprovals(pending) {
    $("#approvals-count").textContent = pending.length;
    $("#approvals-empty").hidden = pending.length > 0;
    if (!changed("approvals", pending)) return;
    $("#approvals tbody").replaceChildren(...pending.map((a) =>
      h("tr", { dataset: { approval: a.id, pid: a.pid, tool: a.tool } },
        h("td", {}, h("code", {}, a.id)),
        h("td", {}, a.pid),
        h("td", {}, h("b", {}, a.tool), h("div", { class: "args" }, JSON.stringify(a.args))),
        h("td", { class: "actions" },
          h("button", { class: "approve", dataset: { action: "approve", id: a.id } }, "Approve"), " ",
          h("button", { class: "deny", dataset: { action: "deny", id: a.id } }, "Deny")))));
  }

  $("#approvals tbody").addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const row = button.closest("tr");
    row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await post(`/api/console/approvals/${encodeURIComponent(button.dataset.id)}`,
        { approve: button.dataset.action === "approve" });
      poll();
    } catch (error) {
      banner(`${button.dataset.action} ${button.dataset.id}: ${error.message}`);
      row.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    }
  });

  // -- logs ---------------------------------------------------------------------------
  function selectLog(pid) {
    state.selected = pid;
    state.logPick += 1;
    state.logOffset = null;
    $("#log").textContent = "";
    $("#log").dataset.pid = pid;
    $("#log-pid").textContent = `— pid ${pid}`;
    delete state.last.ps; // redraw to move the highlight
    poll();
  }

  async function pollLog() {
    const pid = state.selected;
    const pick = state.logPick;
    if (pid === null) return;
    const query = state.logOffset === null ? "" : `?offset=${state.logOffset}`;
    const answer = await api(`/api/console/logs/${pid}${query}`);
    if (pick !== state.logPick) return; // picked again meanwhile: that read starts anew
    const pane = $("#log");
    const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
    if (answer.text) pane.textContent = (pane.textContent + answer.text).slice(-LOG_CHARS);
    state.logOffset = answer.offset;
    $("#log-pid").textContent = `— pid ${pid}${answer.alive ? "" : " (exited)"}`;
    if (atBottom) pane.scrollTop = pane.scrollHeight;
  }

  // -- the loop -----------------------------------------------------------------------
  function renderHeader(s) {
    $("#kernel-name").textContent = `kernel ${s.name} · up ${Math.round(s.uptime_s)} s`;
    const model = s.model || {};
    $("#model").textContent = model.path
      ? `${model.path.split("/").pop()} · ${model.dtype} on ${model.device}` : "";
  }

  async function refresh() {
    try {
      const [status, procs, approvals] = await Promise.all([
        api("/api/console/status"),
        api(`/api/console/ps?all=${state.showExited}`),
        api("/api/console/approvals"),
      ]);
      renderHeader(status);
      renderMemory(status.memory || {});
      renderScheduler(status);
      renderProcesses(procs);
      renderApprovals(approvals);
      await pollLog().catch((error) => {
        $("#log-pid").textContent = `— pid ${state.selected}: ${error.message}`;
      });
      banner(null);
    } catch (error) {
      banner(error.message);
    } finally {
      state.polls += 1;
      document.body.dataset.polls = state.polls;
    }
  }

  let inflight = null;
  function poll() {
    if (!inflight) inflight = refresh().finally(() => { inflight = null; });
    return inflight;
  }

  const keyInput = $("#api-key");
  keyInput.value = localStorage.getItem(KEY) || "";
  keyInput.addEventListener("change", () => {
    if (keyInput.value.trim()) localStorage.setItem(KEY, keyInput.value.trim());
    else localStorage.removeItem(KEY);
    state.last = {};
    poll();
  });
  $("#show-exited").addEventListener("change", (event) => {
    state.showExited = event.target.checked;
    poll();
  });

  poll();
  setInterval(poll, POLL_MS);
})();
