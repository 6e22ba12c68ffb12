// The gateway's live admin page: one EventSource on /events (a snapshot a second), the
// token asked once on a 401 and kept in sessionStorage for this tab only.
"use strict";

(() => {
  const KEY = "gateway-admin-token";
  const WINDOW_SECONDS = 300;
  const COLOURS = ["#0b62c4", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#1098ad"];
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(KEY) || "";
  let source = null;
  let last = null;
  let peers = [];
  let sortKey = "messages_out";
  let sortDown = true;
  const history = [];
  const rows = new Map();

  const auth = () => (token ? { Authorization: "Bearer " + token } : {});

  function setStatus(text, state) {
    $("status").textContent = text;
    $("status").dataset.state = state;
  }

  async function start() {
    let response;
    try {
      response = await fetch("/stats", { headers: auth(), cache: "no-store" });
    } catch (error) {
      setStatus("Unreachable; retrying", "closed");
      setTimeout(start, 3000);
      return;
    }
    if (response.status === 401) {
      askToken(token !== "");
      return;
    }
    $("signin").hidden = true;
    listen();
  }

  function askToken(refused) {
    if (source) source.close();
    source = null;
    $("signin").hidden = false;
    $("signin-error").textContent = refused ? "That token was refused." : "";
    setStatus("Needs the admin token", "closed");
    $("token").focus();
  }

  function listen() {
    const query = token ? "?token=" + encodeURIComponent(token) : "";
    source = new EventSource("/events" + query);
    source.onopen = () => setStatus("Live", "open");
    source.onmessage = (event) => update(JSON.parse(event.data));
    source.onerror = () => {
      setStatus("Reconnecting…", "closed");
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        setTimeout(start, 2000); // refused (401, 503): ask again
      }
    };
  }

  function update(event) {
    const stats = event.stats;
    if (last && event.time > last.time) {
      const seconds = event.time - last.time;
      history.push({
        time: event.time,
        in: (stats.messages_received - last.stats.messages_received) / seconds,
        delivered: (stats.messages_delivered - last.stats.messages_delivered) / seconds,
        connections: stats.connections,
      });
    }
    last = event;
    while (history.length && history[0].time < event.time - WINDOW_SECONDS) history.shift();
    showTotals(stats, event.problems);
    const transports = new Set();
    history.forEach((point) => Object.keys(point.connections).forEach((t) => transports.add(t)));
    chart("rates", [
      { name: "in/s", values: history.map((point) => point.in) },
      { name: "delivered/s", values: history.map((point) => point.delivered) },
    ]);
    chart("connections", [...transports].sort().map((transport) => ({
      name: transport,
      values: history.map((point) => point.connections[transport] || 0),
    })));
    peers = event.peers;
    showPeers();
  }

  function sum(counts) {
    return Object.values(counts).reduce((a, b) => a + b, 0);
  }

  function showTotals(stats, problems) {
    const totals = [
      ["Version", stats.version],
      ["Uptime", Math.round(stats.uptime_seconds) + " s"],
      ["Peers", stats.peers],
      ["Channels", stats.channels],
      ["Subscriptions", stats.subscriptions],
      ["Messages in", stats.messages_received],
      ["Delivered", stats.messages_delivered],
      ["Dropped", sum(stats.dropped)],
      ["Disconnects", sum(stats.disconnects)],
    ];
    $("totals").replaceChildren(...totals.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = String(value);
      dd.dataset.total = name;
      return [dt, dd];
    }));
    $("health").textContent = problems.length ? problems.join("; ") : "ok";
    $("health").dataset.state = problems.length ? "bad" : "ok";
  }

  function chart(name, series) {
    const svg = $("chart-" + name);
    const top = Math.max(1, ...series.flatMap((line) => line.values));
    const lines = series.map((line, i) => {
      const polyline = document.createElementNS(SVG, "polyline");
      const n = line.values.length;
      const points = line.values.map((v, j) => {
        const x = 600 - (n - 1 - j) * (600 / WINDOW_SECONDS);
        return x.toFixed(1) + "," + (118 - (v / top) * 110).toFixed(1);
      });
      polyline.setAttribute("points", points.join(" "));
      polyline.setAttribute("stroke", COLOURS[i % COLOURS.length]);
      return polyline;
    });
    svg.replaceChildren(...lines);
    const latest = (line) => (line.values.length ? line.values[line.values.length - 1] : 0);
    $("legend-" + name).textContent = series
      .map((line) => line.name + " " + Math.round(latest(line) * 10) / 10)
      .join(" · ") + " (top " + Math.round(top * 10) / 10 + ")";
  }

  function who(peer) {
    return peer.user || peer.tls_subject || "";
  }

  function showPeers() {
    const needle = $("search").value.trim().toLowerCase();
    const shown = peers.filter((peer) => !needle || [peer.id, peer.transport, peer.listener,
      who(peer), peer.address].join(" ").toLowerCase().includes(needle));
    const value = (peer) => (sortKey === "who" ? who(peer) : peer[sortKey]);
    shown.sort((a, b) => {
      const x = value(a);
      const y = value(b);
      const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return sortDown ? -order : order;
    });
    const body = $("peers").tBodies[0];
    const keep = new Set(shown.map((peer) => peer.id));
    for (const [id, row] of rows) {
      if (!keep.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    const now = last ? last.time : 0;
    for (const peer of shown) {
      const row = rows.get(peer.id) || newRow(peer.id);
      const cells = [peer.id, peer.transport, peer.listener, who(peer), peer.address,
        Math.round(now - peer.connected_since) + " s ago", peer.messages_in,
        peer.messages_out, peer.pending_bytes];
      cells.forEach((text, i) => { row.cells[i].textContent = String(text); });
      body.appendChild(row);
    }
    document.querySelectorAll("#peers th[data-key]").forEach((th) => {
      if (th.dataset.key === sortKey) th.setAttribute("aria-sort", sortDown ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
  }

  function newRow(id) {
    const row = document.createElement("tr");
    row.dataset.peer = id;
    for (let i = 0; i < 9; i++) row.insertCell();
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Disconnect";
    button.addEventListener("click", () => disconnect(id, button));
    row.insertCell().appendChild(button);
    rows.set(id, row);
    return row;
  }

  async function disconnect(id, button) {
    button.disabled = true;
    const path = "/peers/" + encodeURIComponent(id) + "/close";
    const response = await fetch(path, { method: "POST", headers: auth(), body: "{}" });
    if (response.status === 401) {
      askToken(true);
    } else if (!response.ok) {
      const reason = await response.json().catch(() => ({}));
      $("notice").textContent = "Could not close " + id + ": " + (reason.error || response.status);
      button.disabled = false;
    } else {
      $("notice").textContent = "Closed " + id;
    }
  }

  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(KEY, token);
    start();
  });
  $("search").addEventListener("input", showPeers);
  document.querySelectorAll("#peers th[data-key]").forEach((th) => {
    th.addEventListener("click", () => {
      sortDown = th.dataset.key === sortKey ? !sortDown : true;
      sortKey = th.dataset.key;
      showPeers();
    });
  });
  start();
})();
