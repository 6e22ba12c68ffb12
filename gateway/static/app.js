// The gateway's browser client: one WebSocket with the gateway.v1.json
// subprotocol, reconnecting with backoff and recovering what it missed meanwhile
// (offsets and epochs: docs/history.md). No build step, no dependencies.
"use strict";

(function () {
  const SUBPROTOCOL = "gateway.v1.json";
  const MAX_LOG_ENTRIES = 500;
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const statusEl = $("status");
  const meEl = $("me");
  const countEl = $("count");
  const onlineEl = $("online");
  const noteEl = $("online-note");
  const logEl = $("log");
  const form = $("composer");
  const input = $("message");
  const sendButton = $("send");
  const channelsEl = $("channels");
  const joinForm = $("join");
  const channelInput = $("channel");
  const joinButton = $("join-button");
  const channelError = $("channel-error");
  const targetEl = $("target");
  const signinForm = $("signin");
  const userInput = $("user");
  const passwordInput = $("password");
  const tokenInput = $("token");
  const anonymousButton = $("anonymous");
  const signinError = $("signin-error");

  let socket = null;
  let myId = null;
  let retryMs = RETRY_FIRST_MS;
  let retryTimer = null;
  // Peers on our channel (id -> transport), from the welcome list and join/leave events.
  const peers = new Map();
  // Our own channel (from the welcome), and the channels and patterns we joined: those
  // are joined again after a reconnect.
  let home = null;
  const joined = new Set();
  // Where we are on each channel that keeps history: the offset of the last message we
  // have and its epoch, for as long as the tab lives. A reconnect resumes from there.
  const positions = new Map();
  // After recovered:false on a channel of the same epoch: what was already shown, so
  // that the replay that follows does not show it twice.
  const shown = new Map();
  // Every peer id this tab has had, and the last messages it sent: those come back in a
  // recovery (the gateway does not echo them, so our offset is behind them) under an
  // earlier id, and were shown when sent. After a restart another peer may have that id.
  const myIds = new Set();
  const mySent = [];
  const MAX_SENT = 50;
  let nextId = 1;
  // How this listener signs in (from /signin.json): methods, and whether one may skip it.
  let signin = { methods: [], anonymous: true };
  // The auth request for the next connection only: never stored, forgotten once sent.
  let credentials = null;
  let signedIn = false;

  function socketUrl() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = "";
    const at = home === null ? undefined : positions.get(home);
    if (at !== undefined) {
      // Resume the listener's channel (ours) right after the last message we have.
      url.search = "?since=" + at.offset + "&epoch=" + encodeURIComponent(at.epoch);
    }
    return url.href;
  }

  // Move our position on ``channel`` to what ``event`` says we have (a message, or a
  // welcome/subscribed event giving the channel's position). A new epoch starts over.
  function advance(channel, event) {
    if (typeof event.offset !== "number" || typeof event.epoch !== "string" || !channel) {
      return;
    }
    const at = positions.get(channel);
    if (at === undefined || at.epoch !== event.epoch) {
      positions.set(channel, { offset: event.offset, epoch: event.epoch });
    } else if (event.offset > at.offset) {
      at.offset = event.offset;
    }
  }

  // The answer to a recovery: recovered:false means messages may have been missed here.
  function recovery(channel, event) {
    if (event.recovered !== false) {
      return;
    }
    const at = positions.get(channel);
    if (at !== undefined && at.epoch === event.epoch) {
      shown.set(channel, { offset: at.offset, epoch: at.epoch });
    } else {
      shown.delete(channel);
    }
    positions.delete(channel); // start again from what this answer says
    addMissed(channel);
  }

  // Whether a recovered or replayed message is one this tab sent under an earlier id.
  function sentEarlier(event) {
    if (event.recovered !== true && event.history !== true) {
      return false;
    }
    if (!myIds.has(event.from) || typeof event.text !== "string") {
      return false;
    }
    const i = mySent.findIndex((m) => m.channel === event.channel && m.text === event.text);
    if (i < 0) {
      return false;
    }
    mySent.splice(i, 1);
    return true;
  }

  // Whether a replayed message was shown already (before a gap in the same epoch).
  function seen(event) {
    const before = shown.get(event.channel);
    return (
      event.history === true &&
      before !== undefined &&
      before.epoch === event.epoch &&
      typeof event.offset === "number" &&
      event.offset <= before.offset
    );
  }

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
  }

  function setConnected(connected) {
    input.disabled = !connected;
    sendButton.disabled = !connected;
    channelInput.disabled = !connected;
    joinButton.disabled = !connected;
    targetEl.disabled = !connected;
    if (connected && document.activeElement === document.body) {
      input.focus();
    }
  }

  function timeNow() {
    const d = new Date();
    return [d.getHours(), d.getMinutes(), d.getSeconds()]
      .map((n) => String(n).padStart(2, "0"))
      .join(":");
  }

  function append(item) {
    const atBottom = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 40;
    logEl.appendChild(item);
    while (logEl.childElementCount > MAX_LOG_ENTRIES) {
      logEl.firstElementChild.remove();
    }
    if (atBottom) {
      logEl.scrollTop = logEl.scrollHeight;
    }
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function addMessage(from, transport, body, options) {
    const item = document.createElement("li");
    item.className = "message" + (options.mine ? " mine" : "");
    item.appendChild(span("when", timeNow()));
    item.appendChild(span("who", from));
    item.appendChild(span("via", transport));
    item.appendChild(span("channel", options.channel || ""));
    item.appendChild(span(options.binary ? "text binary" : "text", body));
    append(item);
  }

  function addMissed(channel) {
    const item = document.createElement("li");
    item.className = "missed";
    item.appendChild(span("when", timeNow()));
    item.appendChild(span("channel", channel || ""));
    item.appendChild(span("event", "— some messages were missed —"));
    append(item);
  }

  function addEvent(text) {
    const item = document.createElement("li");
    item.appendChild(span("when", timeNow()));
    item.appendChild(span("event", text));
    append(item);
  }

  function binaryLabel(encoded) {
    const padding = encoded.endsWith("==") ? 2 : encoded.endsWith("=") ? 1 : 0;
    const size = Math.floor((encoded.length * 3) / 4) - padding;
    return "[binary, " + size + " bytes] " + encoded.slice(0, 64) + (encoded.length > 64 ? "…" : "");
  }

  function renderOnline(channelCount) {
    const tally = new Map();
    for (const transport of peers.values()) {
      tally.set(transport, (tally.get(transport) || 0) + 1);
    }
    onlineEl.replaceChildren();
    for (const [transport, n] of [...tally.entries()].sort()) {
      const item = document.createElement("li");
      item.appendChild(span("transport", transport));
      item.appendChild(span("n", String(n)));
      onlineEl.appendChild(item);
    }
    if (channelCount !== undefined && channelCount > peers.size) {
      noteEl.hidden = false;
      noteEl.textContent = "Showing " + peers.size + " of " + channelCount + " peers on this channel.";
    } else if (channelCount !== undefined) {
      noteEl.hidden = true;
    }
  }

  function setCount(count) {
    countEl.textContent = String(count);
  }

  function isPattern(name) {
    return name.split(".").some((token) => token === "*" || token === ">");
  }

  function renderChannels() {
    channelsEl.replaceChildren();
    const names = home === null ? [...joined] : [home, ...[...joined].filter((c) => c !== home)];
    for (const name of names) {
      const item = document.createElement("li");
      item.appendChild(span("name", name));
      if (name !== home) {
        const leave = document.createElement("button");
        leave.type = "button";
        leave.className = "leave";
        leave.textContent = "Leave";
        leave.setAttribute("aria-label", "Leave " + name);
        leave.addEventListener("click", () => request({ type: "unsubscribe", channel: name }));
        item.appendChild(leave);
      }
      channelsEl.appendChild(item);
    }
    const chosen = targetEl.value;
    targetEl.replaceChildren();
    for (const name of names.filter((n) => !isPattern(n))) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      targetEl.appendChild(option);
    }
    if ([...targetEl.options].some((o) => o.value === chosen)) {
      targetEl.value = chosen;
    }
  }

  function request(fields) {
    if (socket === null || socket.readyState !== WebSocket.OPEN) {
      return;
    }
    fields.id = nextId++;
    socket.send(JSON.stringify(fields));
  }

  function handle(event) {
    switch (event.type) {
      case "welcome":
        myId = event.peer;
        myIds.add(myId);
        retryMs = RETRY_FIRST_MS;
        peers.clear();
        for (const p of event.peers || []) {
          peers.set(p.peer, p.transport);
        }
        setCount(event.count);
        renderOnline(event.channel_count);
        meEl.textContent = "as " + myId + (event.user ? " (" + event.user + ")" : "");
        signedIn = typeof event.user === "string";
        signinForm.hidden = true;
        setStatus("open", "Connected");
        setConnected(true);
        home = event.channel || null;
        renderChannels();
        addEvent("Connected as " + myId + (event.channel ? " on channel " + event.channel : ""));
        recovery(home, event);
        if (event.recovered !== true) {
          advance(home, event); // else the recovered messages that follow move us on
        }
        for (const channel of joined) {
          // Again, after a reconnect: from where we were, when we know it.
          const at = positions.get(channel);
          const again = { type: "subscribe", channel: channel };
          if (at !== undefined && !isPattern(channel)) {
            again.since = { offset: at.offset, epoch: at.epoch };
          }
          request(again);
        }
        break;
      case "join":
        setCount(event.count);
        if (event.channel === undefined || event.channel === home) {
          peers.set(event.peer, event.transport);
          renderOnline();
          addEvent(event.peer + " joined via " + event.transport);
        } else {
          addEvent(event.peer + " joined " + event.channel + " via " + event.transport);
        }
        break;
      case "leave":
        setCount(event.count);
        if (event.channel === undefined || event.channel === home) {
          peers.delete(event.peer);
          renderOnline();
          addEvent(event.peer + " left");
        } else {
          addEvent(event.peer + " left " + event.channel);
        }
        break;
      case "subscribed":
        if (!joined.has(event.channel)) {
          joined.add(event.channel);
          addEvent("Joined " + event.channel);
        }
        recovery(event.channel, event);
        advance(event.channel, event);
        renderChannels();
        break;
      case "unsubscribed":
        joined.delete(event.channel);
        positions.delete(event.channel);
        shown.delete(event.channel);
        renderChannels();
        addEvent("Left " + event.channel);
        break;
      case "error":
        if (event.code === "auth_failed" || event.code === "auth_expired") {
          showSignin(event.code === "auth_failed" ? "Sign-in failed" : "Signed out: the session expired");
          break;
        }
        channelError.hidden = false;
        channelError.textContent = event.reason || event.code;
        break;
      case "message":
        advance(event.channel, event);
        if (event.from === myId || sentEarlier(event) || seen(event)) {
          return; // already shown: when sent, or before the gap
        }
        if (typeof event.text === "string") {
          addMessage(event.from, event.transport, event.text, { channel: event.channel });
        } else if (typeof event.base64 === "string") {
          addMessage(event.from, event.transport, binaryLabel(event.base64), {
            binary: true,
            channel: event.channel,
          });
        }
        break;
      default:
        break;
    }
  }

  function connect() {
    retryTimer = null;
    setStatus("connecting", "Connecting…");
    let ws;
    try {
      ws = new WebSocket(socketUrl(), SUBPROTOCOL);
    } catch (err) {
      scheduleReconnect("cannot connect: " + err.message);
      return;
    }
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.addEventListener("open", () => {
      if (credentials !== null) {
        ws.send(JSON.stringify(credentials)); // the first message signs in
        credentials = null;
      }
    });
    ws.addEventListener("message", (msg) => {
      if (typeof msg.data !== "string") {
        return; // JSON clients only get text frames
      }
      let event;
      try {
        event = JSON.parse(msg.data);
      } catch (err) {
        return;
      }
      if (event && typeof event === "object") {
        handle(event);
      }
    });
    ws.addEventListener("close", (ev) => {
      if (socket !== ws) {
        return;
      }
      socket = null;
      if (myId !== null) {
        addEvent("Disconnected" + (ev.reason ? ": " + ev.reason : ""));
      }
      myId = null;
      peers.clear();
      renderOnline(0);
      setConnected(false);
      meEl.textContent = "";
      const why = ev.code && ev.code !== 1006 ? " (" + ev.code + (ev.reason ? ": " + ev.reason : "") + ")" : "";
      if (ev.code === 4001 || (signedIn && signin.methods.length > 0)) {
        // Signing in is needed again: the password is not kept, so ask for it.
        signedIn = false;
        showSignin(ev.code === 4001 ? "Sign-in failed or ended" + why : "Disconnected" + why);
        return;
      }
      scheduleReconnect("Disconnected" + why);
    });
  }

  function scheduleReconnect(text) {
    if (retryTimer !== null) {
      return;
    }
    // Exponential backoff with jitter, so many pages do not reconnect at once.
    const delay = Math.round(retryMs * (0.75 + Math.random() * 0.5));
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    setStatus("closed", text + " — reconnecting in " + Math.ceil(delay / 1000) + " s");
    retryTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (socket === null && retryTimer !== null) {
      clearTimeout(retryTimer);
      retryMs = RETRY_FIRST_MS;
      connect();
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text || socket === null || socket.readyState !== WebSocket.OPEN || myId === null) {
      return;
    }
    const channel = targetEl.value || home;
    socket.send(JSON.stringify({ type: "message", channel: channel, text: text }));
    mySent.push({ channel: channel, text: text });
    if (mySent.length > MAX_SENT) {
      mySent.shift();
    }
    addMessage("you (" + myId + ")", peers.get(myId) || (location.protocol === "https:" ? "wss" : "ws"), text, { mine: true, channel: channel });
    input.value = "";
    input.focus();
  });

  joinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = channelInput.value.trim();
    if (!name) {
      return;
    }
    channelError.hidden = true;
    request({ type: "subscribe", channel: name });
    channelInput.value = "";
  });

  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      input.value = "";
    }
  });

  function showSignin(error) {
    if (retryTimer !== null) {
      clearTimeout(retryTimer);
      retryTimer = null;
    }
    setStatus("closed", error || "Sign in to connect");
    signinForm.hidden = false;
    $("signin-password").hidden = !signin.methods.includes("password");
    $("signin-token").hidden = !(signin.methods.includes("token") || signin.methods.includes("jwt"));
    anonymousButton.hidden = !signin.anonymous;
    signinError.hidden = !error;
    signinError.textContent = error || "";
  }

  signinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = tokenInput.value.trim();
    if (token) {
      credentials = signin.methods.includes("token") || token.split(".").length !== 3
        ? { type: "auth", token: token }
        : { type: "auth", jwt: token };
    } else if (userInput.value && passwordInput.value) {
      credentials = { type: "auth", user: userInput.value, password: passwordInput.value };
    } else {
      signinError.hidden = false;
      signinError.textContent = "Enter a user and password, or a token";
      return;
    }
    passwordInput.value = ""; // never kept in the page
    tokenInput.value = "";
    signinForm.hidden = true;
    if (socket !== null) {
      socket.close();
    }
    connect();
  });

  anonymousButton.addEventListener("click", () => {
    signinForm.hidden = true;
    credentials = null;
    connect();
  });

  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      reconnectNow();
    }
  });

  // Ask the listener how it signs in first; a page that cannot tell just connects.
  fetch("signin.json", { cache: "no-store" })
    .then((response) => (response.ok ? response.json() : signin))
    .catch(() => signin)
    .then((info) => {
      signin = info;
      if (signin.methods.length > 0) {
        showSignin("");
      } else {
        connect();
      }
    });
})();
