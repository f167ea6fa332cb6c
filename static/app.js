// wsfan chat client: plain JS, no build step, no third-party code. It speaks
// Centrifugo's JSON protocol to /connection/websocket on the host that served the page,
// and keeps the channel's position (epoch and offset) so that after a reconnect — its
// instance restarted, the network came back — it recovers every message it missed, or
// says that history no longer holds them.
(function () {
  "use strict";
  const statusEl = document.getElementById("status");
  const list = document.getElementById("messages");
  const text = document.getElementById("text");
  const channelInput = document.getElementById("channel");
  const params = new URLSearchParams(location.search);
  let channel = params.get("channel") || "chat_messages";
  channelInput.value = params.get("channel") || "";

  let ws = null;
  let attempt = 0;        // consecutive failed connects, for backoff
  let retryTimer = null;
  let nextId = 1;
  let position = null;    // {epoch, offset} of the last message shown
  let subscribed = false;
  const BASE_MS = 300, MAX_MS = 10000;

  function url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return proto + "//" + location.host + "/connection/websocket";
  }

  function setStatus(up, label) {
    statusEl.className = "status " + (up ? "up" : "down");
    statusEl.textContent = label;
  }

  function show(content, binary) {
    const li = document.createElement("li");
    // textContent, never innerHTML: message text cannot inject markup.
    li.textContent = content;
    if (binary) li.className = "binary";
    list.appendChild(li);
    while (list.children.length > 500) list.removeChild(list.firstChild);
    list.scrollTop = list.scrollHeight;
  }

  // A publication: its data shown as the text a plain client would see.
  function showPub(pub) {
    const d = pub.data;
    if (typeof d === "string") show(d, false);
    else if (d && typeof d === "object" && typeof d.b64 === "string" && Object.keys(d).length === 1)
      show("[binary message, " + atob(d.b64).length + " bytes]", true);
    else show(JSON.stringify(d), false);
    if (position && typeof pub.offset === "number") position.offset = pub.offset;
  }

  function send(cmd) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(cmd));
  }

  function subscribeCmd() {
    const sub = { channel: channel, recoverable: true, positioned: true };
    if (position && position.epoch) {
      sub.recover = true;
      sub.offset = position.offset;
      sub.epoch = position.epoch;
    }
    return { id: nextId++, subscribe: sub };
  }

  function onReply(r) {
    if (!r.id) {
      if (r.push && r.push.channel === channel) {
        if (r.push.pub && subscribed) showPub(r.push.pub);
        // "Insufficient state" (2500+): subscribe again and recover.
        if (r.push.unsubscribe && r.push.unsubscribe.code >= 2500) {
          subscribed = false;
          send(subscribeCmd());
        }
      } else if (!r.push) {
        send({}); // the server's ping: answer it
      }
      return;
    }
    if (r.connect) {
      setStatus(false, "joining " + channel + "…");
      send(subscribeCmd());
    } else if (r.subscribe) {
      const s = r.subscribe;
      const pubs = s.publications || [];
      position = { epoch: s.epoch, offset: s.offset };
      subscribed = true;
      pubs.forEach(showPub);
      let label = "connected to " + channel;
      if (s.was_recovering && s.recovered) label += ", recovered " + pubs.length + " messages";
      else if (s.was_recovering) label += ", history lost: some messages may be missing";
      setStatus(true, label);
    } else if (r.error) {
      setStatus(false, "error " + r.error.code + ": " + r.error.message);
    }
  }

  function connect() {
    clearTimeout(retryTimer);
    const sock = new WebSocket(url());
    ws = sock;
    subscribed = false;
    setStatus(false, attempt ? "reconnecting…" : "connecting…");
    sock.onopen = function () {
      if (ws !== sock) return;
      attempt = 0;
      const token = params.get("token");
      send({ id: nextId++, connect: token ? { token: token } : {} });
    };
    sock.onmessage = function (ev) {
      if (ws !== sock || typeof ev.data !== "string") return;
      ev.data.split("\n").filter(function (l) { return l.trim() !== ""; })
        .forEach(function (l) { onReply(JSON.parse(l)); });
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      subscribed = false;
      // Capped exponential backoff with full jitter, so a restarted instance is not
      // hit by every client at the same instant.
      const cap = Math.min(MAX_MS, BASE_MS * Math.pow(2, attempt));
      const delay = Math.round(Math.random() * cap);
      attempt++;
      setStatus(false, "reconnecting… (" + ev.code + ", next try in " + (delay / 1000).toFixed(1) + " s)");
      retryTimer = setTimeout(connect, delay);
    };
  }

  document.getElementById("send-form").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!subscribed || text.value === "") return;
    send({ id: nextId++, publish: { channel: channel, data: text.value } });
    text.value = "";
  });

  document.getElementById("channel-form").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!channelInput.checkValidity()) return;
    channel = channelInput.value || "chat_messages";
    list.textContent = "";
    position = null;
    attempt = 0;
    if (ws) { const old = ws; ws = null; old.close(1000); }
    connect();
  });

  connect();
})();
