// The gateway's live admin page: one EventSource on /events (a snapshot a second), the
// token asked once on a 401 and kept in sessionStorage for this tab only. The peers table
// shows the snapshot's busiest peers, or pages of /peers (all of them, in join order; there
// the search box searches every peer, through /peers?q=), with each peer's messages in and
// out per second worked out from two successive reads.
"use strict";

(() => {
  const KEY = "gateway-admin-token";
  const WINDOW_SECONDS = 300;
  const PAGE_SIZE = 100;
  const COLOURS = ["#0b62c4", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#1098ad"];
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(KEY) || "";
  let source = null;
  let last = null;
  let peers = [];
  let sortKey = "messages_out";
  let sortDown = true;
  let offset = 0;
  let total = 0;
  let fetching = false;
  const history = [];
  const rows = new Map();
  const counted = new Map(); // peer id -> {time, in, out, rates}: the last read of its counters

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

  function perSecond(now, was, seconds) {
    const rates = {};
    for (const key of Object.keys(now)) rates[key] = (now[key] - (was[key] || 0)) / seconds;
    return rates;
  }

  function update(event) {
    const stats = event.stats;
    if (last && event.time > last.time) {
      const was = last.stats;
      const seconds = event.time - last.time;
      history.push({
        time: event.time,
        in: (stats.messages_received - was.messages_received) / seconds,
        delivered: (stats.messages_delivered - was.messages_delivered) / seconds,
        bytesIn: (stats.bytes_received - was.bytes_received) / seconds,
        bytesOut: (stats.bytes_delivered - was.bytes_delivered) / seconds,
        drops: perSecond(stats.dropped, was.dropped, seconds),
        disconnects: perSecond(stats.disconnects, was.disconnects, seconds),
        connections: stats.connections,
      });
    }
    last = event;
    while (history.length && history[0].time < event.time - WINDOW_SECONDS) history.shift();
    showTotals(stats);
    showNode(event.node, stats, event.problems);
    showChannels(event.channels);
    showCharts();
    if ($("view").value === "busiest") {
      peers = withRates(event.peers, event.time);
      showPeers();
    } else {
      fetchPage();
    }
  }

  function showCharts() {
    const along = (key) => [...new Set(history.flatMap((point) => Object.keys(point[key])))]
      .sort().map((part) => ({ name: part, values: history.map((p) => p[key][part] || 0) }));
    const series = (pairs) => pairs.map(([name, key]) => ({
      name, values: history.map((point) => point[key]),
    }));
    chart("rates", series([["in/s", "in"], ["delivered/s", "delivered"]]));
    chart("bytes", series([["in B/s", "bytesIn"], ["delivered B/s", "bytesOut"]]));
    chart("connections", along("connections"));
    chart("drops", along("drops"));
    chart("disconnects", along("disconnects"));
  }

  function sum(counts) {
    return Object.values(counts).reduce((a, b) => a + b, 0);
  }

  function describe(list, pairs) {
    list.replaceChildren(...pairs.flatMap(([name, value, state]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = String(value);
      dd.dataset.item = name;
      if (state) dd.dataset.state = state;
      return [dt, dd];
    }));
  }

  function showTotals(stats) {
    describe($("totals"), [
      ["Peers", stats.peers],
      ["Channels", stats.channels],
      ["Subscriptions", stats.subscriptions],
      ["Messages in", stats.messages_received],
      ["Delivered", stats.messages_delivered],
      ["Bytes in", stats.bytes_received],
      ["Bytes delivered", stats.bytes_delivered],
      ["Dropped", sum(stats.dropped)],
      ["Disconnects", sum(stats.disconnects)],
    ]);
  }

  function age(seconds) {
    const s = Math.floor(seconds);
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min";
    if (s < 172800) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " days";
  }

  function showNode(node, stats, problems) {
    $("health").textContent = problems.length ? problems.join("; ") : "ok";
    $("health").dataset.state = problems.length ? "bad" : "ok";
    const plane = node.backplane;
    const store = node.history;
    describe($("node"), [
      ["Name", node.name],
      ["Version", stats.version],
      ["Uptime", age(stats.uptime_seconds)],
      ["Workers", node.workers],
      plane
        ? ["Backplane", (plane.up ? "up" : "down") + ", node " + plane.node + ", prefix " +
          plane.prefix + ", " + plane.unforwarded + " batches not forwarded",
        plane.up ? "ok" : "bad"]
        : ["Backplane", "none (no [cluster])"],
      ["History store", store.store + ": " + (store.problem ? "failing: " + store.problem : "ok") +
        (store.store === "memory" ? "" : ", " + store.unwritten + " not written"),
      store.problem ? "bad" : "ok"],
    ]);
    const body = $("listeners").tBodies[0];
    body.replaceChildren(...node.listeners.map((listener) => {
      const row = document.createElement("tr");
      row.dataset.listener = listener.name;
      const port = listener.port === 0 ? "* (any port)" : listener.port;
      [listener.name, listener.type, listener.host + ":" + port,
        listener.up ? "listening" : "not listening"].forEach((text) => {
        row.insertCell().textContent = String(text);
      });
      row.cells[3].dataset.state = listener.up ? "ok" : "bad";
      return row;
    }));
  }

  function showChannels(channels) {
    const top = Math.max(1, ...channels.channels.map((channel) => channel.subscribers));
    $("channels-total").textContent = channels.total + " with subscribers (names and patterns)" +
      (channels.total > channels.channels.length
        ? "; the " + channels.channels.length + " most subscribed:" : "");
    $("channels").tBodies[0].replaceChildren(...channels.channels.map((channel) => {
      const row = document.createElement("tr");
      row.dataset.channel = channel.channel;
      row.insertCell().textContent = channel.channel;
      row.insertCell().textContent = String(channel.subscribers);
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = top;
      meter.value = channel.subscribers;
      row.insertCell().appendChild(meter);
      return row;
    }));
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
    $("legend-" + name).replaceChildren(...series.map((line, i) => {
      const item = document.createElement("span");
      item.className = "key colour-" + (i % COLOURS.length);
      item.textContent = line.name + " " + Math.round(latest(line) * 10) / 10;
      return item;
    }), document.createTextNode(series.length
      ? " (top " + Math.round(top * 10) / 10 + ")" : "none yet"));
  }

  async function fetchPage() {
    if (fetching) return;
    fetching = true;
    try {
      const search = $("search").value.trim();
      const query = "?offset=" + offset + "&limit=" + PAGE_SIZE +
        (search ? "&q=" + encodeURIComponent(search) : "");
      const response = await fetch("/peers" + query, { headers: auth(), cache: "no-store" });
      if (response.status === 401) {
        askToken(true);
        return;
      }
      const page = await response.json();
      if ($("view").value !== "all") return; // switched back while it was on its way
      total = page.matched === undefined ? page.total : page.matched;
      if (offset > 0 && offset >= total) { // peers left: the next event reads the last page
        offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
        return;
      }
      peers = withRates(page.peers.filter((peer) => peer !== null), last ? last.time : 0);
      showPager();
      showPeers();
    } catch (error) {
      $("notice").textContent = "Could not read /peers: " + error;
    } finally {
      fetching = false;
    }
  }

  function showPager() {
    const all = $("view").value === "all";
    $("pager").hidden = !all;
    if (!all) return;
    const end = Math.min(total, offset + PAGE_SIZE);
    const matching = $("search").value.trim() ? " matching" : "";
    $("page").textContent = (total ? offset + 1 : 0) + "–" + end + " of " + total + matching;
    $("previous").disabled = offset === 0;
    $("next").disabled = end >= total;
  }

  // Each peer with rate_in and rate_out: messages per second since its counters were last
  // read (0 on its first read); reads more than a minute old are forgotten.
  function withRates(list, time) {
    for (const [id, was] of counted) if (was.time < time - 60) counted.delete(id);
    return list.map((peer) => {
      const was = counted.get(peer.id);
      let rates = { in: 0, out: 0 };
      if (was && time > was.time) {
        const seconds = time - was.time;
        rates = {
          in: Math.max(0, peer.messages_in - was.in) / seconds,
          out: Math.max(0, peer.messages_out - was.out) / seconds,
        };
      } else if (was) {
        rates = was.rates; // read again within the same second (a page turn)
      }
      counted.set(peer.id, { time, in: peer.messages_in, out: peer.messages_out, rates });
      return { ...peer, rate_in: rates.in, rate_out: rates.out };
    });
  }

  const perSecondText = (value) => String(Math.round(value * 10) / 10);

  function who(peer) {
    return peer.user || peer.tls_subject || "";
  }

  function showPeers() {
    // All: /peers?q= has searched every peer already; busiest: search those 50 here.
    const needle = $("view").value === "all" ? "" : $("search").value.trim().toLowerCase();
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
        age(now - peer.connected_since) + " ago", peer.messages_in, perSecondText(peer.rate_in),
        peer.messages_out, perSecondText(peer.rate_out), peer.pending_bytes];
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
    for (let i = 0; i < 11; i++) row.insertCell();
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

  function turn(step) {
    offset = Math.max(0, offset + step * PAGE_SIZE);
    fetchPage();
  }

  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(KEY, token);
    start();
  });
  let typing = null;
  $("search").addEventListener("input", () => {
    if ($("view").value !== "all") {
      showPeers();
      return;
    }
    clearTimeout(typing);
    typing = setTimeout(() => { // every peer is searched: wait until the typing stops
      offset = 0;
      fetchPage();
    }, 300);
  });
  $("view").addEventListener("change", () => {
    offset = 0;
    showPager();
    if ($("view").value === "all") {
      fetchPage();
    } else {
      peers = last ? last.peers : [];
      showPeers();
    }
  });
  $("previous").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));
  document.querySelectorAll("#peers th[data-key]").forEach((th) => {
    th.addEventListener("click", () => {
      sortDown = th.dataset.key === sortKey ? !sortDown : true;
      sortKey = th.dataset.key;
      showPeers();
    });
  });
  start();
})();
