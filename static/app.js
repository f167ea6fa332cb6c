// wsfan chat client: plain JS, no build step. Works against any wsfan instance:
// it connects back to the host that served the page.
(function () {
  "use strict";
  const statusEl = document.getElementById("status");
  const list = document.getElementById("messages");
  const text = document.getElementById("text");
  const channelInput = document.getElementById("channel");
  const params = new URLSearchParams(location.search);
  let channel = params.get("channel") || "";
  channelInput.value = channel;

  let ws = null;
  let attempt = 0;        // consecutive failed connects, for backoff
  let retryTimer = null;
  const BASE_MS = 500, MAX_MS = 15000;

  function url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const path = channel ? "/ws/" + encodeURIComponent(channel) : "/ws";
    const token = params.get("token");
    return proto + "//" + location.host + path + (token ? "?token=" + encodeURIComponent(token) : "");
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

  function connect() {
    clearTimeout(retryTimer);
    const sock = new WebSocket(url());
    sock.binaryType = "arraybuffer";
    ws = sock;
    setStatus(false, "connecting…");
    sock.onopen = function () {
      if (ws !== sock) return;
      attempt = 0;
      setStatus(true, "connected" + (channel ? " to " + channel : ""));
    };
    sock.onmessage = function (ev) {
      if (ws !== sock) return;
      if (typeof ev.data === "string") show(ev.data, false);
      else show("[binary message, " + ev.data.byteLength + " bytes]", true);
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      // Capped exponential backoff with full jitter, so a restarted instance is not
      // hit by every client at the same instant.
      const cap = Math.min(MAX_MS, BASE_MS * Math.pow(2, attempt));
      const delay = Math.round(Math.random() * cap);
      attempt++;
      setStatus(false, "disconnected (" + ev.code + "), retrying in " + (delay / 1000).toFixed(1) + " s");
      retryTimer = setTimeout(connect, delay);
    };
  }

  document.getElementById("send-form").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!ws || ws.readyState !== WebSocket.OPEN || text.value === "") return;
    ws.send(text.value);
    text.value = "";
  });

  document.getElementById("channel-form").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!channelInput.checkValidity()) return;
    channel = channelInput.value;
    list.textContent = "";
    attempt = 0;
    if (ws) { const old = ws; ws = null; old.close(1000); }
    connect();
  });

  connect();
})();
