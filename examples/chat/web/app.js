// Chat page for the nanomesh chat example (nano's chat demo, without frameworks).
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const nameInput = $('name'), joinBtn = $('join'), statusEl = $('status');
  const membersEl = $('members'), messagesEl = $('messages'), input = $('input'), sendBtn = $('send');
  let nickname = '';
  let kicked = false;

  // wsURL picks the WebSocket endpoint: ?ws=<path or ws(s):// URL>, else a
  // data-ws-path attribute on <body>, else the nanomesh-ws-path meta tag (the
  // server rewrites it to its -wspath), else /nano; on this page's host.
  function wsURL() {
    const meta = document.querySelector('meta[name="nanomesh-ws-path"]');
    let path = new URLSearchParams(location.search).get('ws') ||
      document.body.dataset.wsPath || (meta && meta.content) || '/nano';
    if (/^wss?:\/\//i.test(path)) return path;
    if (path.charAt(0) !== '/') path = '/' + path;
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    return scheme + (location.host || 'localhost:3250') + path;
  }

  function setStatus(text, cls) {
    statusEl.textContent = text;
    statusEl.className = cls || text;
  }

  function setJoined(joined) {
    input.disabled = sendBtn.disabled = !joined;
    nameInput.disabled = joinBtn.disabled = joined;
    if (joined) input.focus();
  }

  function append(el) {
    const atBottom = messagesEl.scrollTop + messagesEl.clientHeight >= messagesEl.scrollHeight - 4;
    messagesEl.appendChild(el);
    if (atBottom) messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  // A chat line: <div class="msg"><b>name</b>: content</div> (text only, never HTML).
  function chatLine(name, content) {
    const div = document.createElement('div');
    div.className = 'msg';
    const b = document.createElement('b');
    b.textContent = String(name);
    div.appendChild(b);
    div.appendChild(document.createTextNode(': ' + String(content)));
    append(div);
  }

  function systemLine(text) {
    const div = document.createElement('div');
    div.className = 'sys';
    div.textContent = text;
    append(div);
  }

  // Server pushes (handlers stay registered across reconnects).
  nanomesh.on('onMembers', function (data) {
    membersEl.textContent = '';
    ((data && data.members) || []).forEach(function (m) {
      const li = document.createElement('li');
      li.textContent = String(m);
      membersEl.appendChild(li);
    });
  });
  nanomesh.on('onNewUser', function (data) { systemLine((data && data.content) || 'a new user joined'); });
  nanomesh.on('onMessage', function (data) { if (data) chatLine(data.name, data.content); });

  nanomesh.on('kick', function (data) {
    kicked = true;
    const reason = (data && data.reason) || 'unknown';
    setStatus('kicked: ' + reason, 'kicked');
    systemLine('kicked by the server: ' + reason);
  });
  nanomesh.on('error', function (err) {
    systemLine('error' + (err && err.code ? ' ' + err.code : '') + ': ' + ((err && err.message) || 'unknown'));
  });
  nanomesh.on('heartbeat timeout', function () { systemLine('server stopped answering (heartbeat timeout)'); });
  nanomesh.on('close', function () {
    if (!kicked) setStatus('disconnected');
    membersEl.textContent = '';
    setJoined(false);
  });

  $('login').addEventListener('submit', function (ev) {
    ev.preventDefault();
    nickname = nameInput.value.trim();
    if (!nickname) { nameInput.focus(); return; }
    kicked = false;
    setStatus('connecting…', 'connecting');
    nameInput.disabled = joinBtn.disabled = true;
    nanomesh.init({ url: wsURL(), user: {} }, function () {
      nanomesh.request('room.join', {}, function (resp) {
        if (resp && typeof resp.code === 'number' && resp.code !== 0) { // error response or refusal
          systemLine('join failed: ' + (resp.message || resp.result || resp.code));
          nanomesh.disconnect();
          return;
        }
        setStatus('connected');
        setJoined(true);
        systemLine('joined as ' + nickname);
      });
    });
  });

  $('composer').addEventListener('submit', function (ev) {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !nanomesh.connected()) return;
    // The server broadcasts it back to the whole room, us included.
    nanomesh.notify('room.message', { name: nickname, content: text });
    input.value = '';
  });

  nameInput.focus();
})();
