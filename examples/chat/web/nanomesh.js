/*
 * nanomesh.js - a dependency-free browser client for the pomelo/nano wire
 * protocol spoken by nanomesh (and nano). Its API follows nano's `starx`:
 *
 *   nanomesh.init({url: "ws://host:port/nano", user: {}}, function () { ... });
 *   nanomesh.request("room.join", {}, function (resp) { ... });
 *   nanomesh.notify("room.message", {content: "hi"});
 *   nanomesh.on("onMessage", function (msg) { ... });   // server pushes
 *   nanomesh.on("close" | "kick" | "error" | "heartbeat timeout", fn);
 *   nanomesh.disconnect();
 *
 * Wire format (see docs/protocol.md):
 *   packet:  type:1 | length:3 (big-endian) | body
 *   message: flag:1 | id:varint (Request/Response) | route (Request/Notify/Push) | data
 */
(function (global) {
  'use strict';

  const PKG_HANDSHAKE = 1, PKG_HANDSHAKE_ACK = 2, PKG_HEARTBEAT = 3, PKG_DATA = 4, PKG_KICK = 5;
  const MSG_REQUEST = 0, MSG_NOTIFY = 1, MSG_RESPONSE = 2, MSG_PUSH = 3;
  const FLAG_ROUTE_COMPRESSED = 0x01, FLAG_ZLIB = 0x10, FLAG_ERROR = 0x20;
  const MAX_BODY = 0xffffff; // the 3-byte length field caps a packet body at 16 MiB - 1

  const utf8enc = new TextEncoder();
  const utf8dec = new TextDecoder();

  // ---- codec: pure functions, exported as nanomesh._codec for tests ----

  function encodePacket(type, body) {
    body = body || new Uint8Array(0);
    if (body.length > MAX_BODY) throw new Error('nanomesh: packet body too large');
    const out = new Uint8Array(4 + body.length);
    out[0] = type;
    out[1] = (body.length >> 16) & 0xff;
    out[2] = (body.length >> 8) & 0xff;
    out[3] = body.length & 0xff;
    out.set(body, 4);
    return out;
  }

  // PacketReader turns a stream of arbitrary chunks (WebSocket frames may
  // hold several packets, or part of one) into whole packets.
  class PacketReader {
    constructor() { this.buf = new Uint8Array(0); }
    // push appends a chunk and returns the packets completed by it, in order.
    push(chunk) {
      chunk = ArrayBuffer.isView(chunk) ? new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength)
        : new Uint8Array(chunk); // an ArrayBuffer (binaryType 'arraybuffer')
      if (this.buf.length === 0) {
        this.buf = chunk;
      } else {
        const joined = new Uint8Array(this.buf.length + chunk.length);
        joined.set(this.buf);
        joined.set(chunk, this.buf.length);
        this.buf = joined;
      }
      const packets = [];
      let off = 0;
      while (this.buf.length - off >= 4) {
        const b = this.buf;
        const type = b[off];
        if (type < PKG_HANDSHAKE || type > PKG_KICK) throw new Error('nanomesh: unknown packet type ' + type);
        const len = (b[off + 1] << 16) | (b[off + 2] << 8) | b[off + 3];
        if (b.length - off - 4 < len) break; // body not complete yet: wait for more
        packets.push({ type: type, body: b.slice(off + 4, off + 4 + len) });
        off += 4 + len;
      }
      this.buf = this.buf.slice(off); // keep only the unparsed tail
      return packets;
    }
  }

  // Varints are base-128, low 7 bits first (protobuf style). Arithmetic
  // instead of bit operators keeps ids above 2^31 correct.
  function writeVarint(out, n) {
    do {
      let b = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) b |= 0x80;
      out.push(b);
    } while (n > 0);
  }

  function readVarint(b, off) {
    let n = 0, mul = 1;
    for (let i = off; i < b.length && i < off + 10; i++) {
      n += (b[i] & 0x7f) * mul;
      mul *= 128;
      if ((b[i] & 0x80) === 0) return { value: n, next: i + 1 };
    }
    throw new Error('nanomesh: bad message id varint');
  }

  // encodeMessage builds a message body. `dict` maps route -> code; a route
  // found there goes out as its 2-byte code with flag bit 0x01.
  function encodeMessage(type, id, route, data, dict) {
    const head = [type << 1];
    if (type === MSG_REQUEST || type === MSG_RESPONSE) writeVarint(head, id);
    if (type !== MSG_RESPONSE) {
      const code = dict ? dict[route] : undefined;
      if (code !== undefined) {
        head[0] |= FLAG_ROUTE_COMPRESSED;
        head.push((code >> 8) & 0xff, code & 0xff);
      } else {
        const r = utf8enc.encode(route);
        if (r.length > 255) throw new Error('nanomesh: route longer than 255 bytes: ' + route);
        head.push(r.length);
        for (let i = 0; i < r.length; i++) head.push(r[i]);
      }
    }
    data = data || new Uint8Array(0);
    const out = new Uint8Array(head.length + data.length);
    out.set(head);
    out.set(data, head.length);
    return out;
  }

  // decodeMessage parses a message body. `codes` maps code -> route.
  function decodeMessage(b, codes) {
    if (b.length < 1) throw new Error('nanomesh: empty message');
    const flag = b[0];
    const m = { type: (flag >> 1) & 0x07, id: 0, route: '', error: (flag & FLAG_ERROR) !== 0,
                zlib: (flag & FLAG_ZLIB) !== 0, data: null };
    let off = 1;
    if (m.type === MSG_REQUEST || m.type === MSG_RESPONSE) {
      const v = readVarint(b, off);
      m.id = v.value;
      off = v.next;
    }
    if (m.type === MSG_REQUEST || m.type === MSG_NOTIFY || m.type === MSG_PUSH) {
      if (flag & FLAG_ROUTE_COMPRESSED) {
        if (b.length < off + 2) throw new Error('nanomesh: short route code');
        const code = (b[off] << 8) | b[off + 1];
        m.route = codes ? codes[code] : undefined;
        if (m.route === undefined) throw new Error('nanomesh: unknown route code ' + code);
        off += 2;
      } else {
        if (b.length < off + 1 || b.length < off + 1 + b[off]) throw new Error('nanomesh: short route');
        m.route = utf8dec.decode(b.subarray(off + 1, off + 1 + b[off]));
        off += 1 + b[off];
      }
    }
    m.data = b.slice(off);
    return m;
  }

  const encodeJSON = (v) => utf8enc.encode(JSON.stringify(v === undefined ? {} : v));
  // decodeJSON returns the parsed body, null for an empty one, or the raw text if it is not JSON.
  function decodeJSON(b) {
    if (!b || b.length === 0) return null;
    const s = utf8dec.decode(b);
    try { return JSON.parse(s); } catch (e) { return s; }
  }

  // ---- the client ----

  const nm = {};
  const listeners = {};   // event or push route -> [fn]
  const callbacks = {};   // request id -> response callback
  let socket = null, reader = null, reqId = 0;
  let dict = {}, codes = {};            // route -> code, code -> route (from the handshake)
  let heartbeatMs = 0, heartbeatTimer = null, timeoutTimer = null, lastSent = 0;
  let ready = false;                    // handshake done, HandshakeAck sent
  let initCallback = null, handshakeCallback = null;

  nm.on = function (event, fn) { (listeners[event] = listeners[event] || []).push(fn); return nm; };
  nm.off = function (event, fn) {
    if (!fn) delete listeners[event];
    else if (listeners[event]) listeners[event] = listeners[event].filter((f) => f !== fn);
    return nm;
  };
  // call runs a user callback; one that throws must not stop the packets after it.
  function call(fn, args, what) {
    try { fn.apply(nm, args); } catch (e) { console.error('nanomesh:', what, 'threw', e); }
  }
  nm.emit = function (event, ...args) {
    (listeners[event] || []).slice().forEach((fn) => call(fn, args, 'listener for ' + event));
  };

  function send(type, body) {
    if (socket && socket.readyState === 1 /* OPEN */) {
      socket.send(encodePacket(type, body));
      lastSent = Date.now();
    }
  }

  // sendData sends a message; the server closes a connection that sends Data before HandshakeAck.
  function sendData(body) {
    if (!ready) { nm.emit('error', { code: 0, message: 'nanomesh: not connected' }); return false; }
    send(PKG_DATA, body);
    return true;
  }

  function stopTimers() {
    clearInterval(heartbeatTimer);
    clearTimeout(timeoutTimer);
    heartbeatTimer = timeoutTimer = null;
  }

  // Any packet from the server proves it alive; silence for 2 x heartbeat means it is gone.
  function armTimeout() {
    if (!heartbeatMs) return;
    clearTimeout(timeoutTimer);
    timeoutTimer = setTimeout(function () {
      nm.emit('heartbeat timeout');
      nm.disconnect();
    }, 2 * heartbeatMs);
  }

  nm.init = function (params, cb) {
    if (socket) { socket.onclose = null; nm.disconnect(); } // replace silently: no stale 'close'
    params = params || {};
    let url = params.url;
    if (!url) { // starx style: host, port, path
      url = 'ws://' + (params.host || location.hostname) + (params.port ? ':' + params.port : '') + (params.path || '/');
    }
    initCallback = cb || null;
    handshakeCallback = params.handshakeCallback || null;
    reader = new PacketReader();
    reqId = 0;
    dict = {}; codes = {};
    heartbeatMs = 0;
    ready = false;

    const ws = new WebSocket(url);
    socket = ws;
    ws.binaryType = 'arraybuffer';
    ws.onopen = function () {
      send(PKG_HANDSHAKE, encodeJSON({ sys: { type: 'js-websocket', version: '0.0.1' }, user: params.user || {} }));
    };
    ws.onmessage = function (ev) {
      if (ws !== socket) return; // a stale socket after disconnect()/re-init
      let packets;
      try {
        packets = reader.push(ev.data);
      } catch (e) {
        nm.emit('error', { code: 0, message: e.message });
        nm.disconnect();
        return;
      }
      armTimeout();
      for (const p of packets) {
        if (ws !== socket) return;
        handlePacket(p);
      }
    };
    ws.onerror = function (ev) { nm.emit('io-error', ev); };
    ws.onclose = function (ev) {
      if (ws === socket) { stopTimers(); socket = null; ready = false; }
      nm.emit('close', ev);
    };
  };

  function handlePacket(p) {
    switch (p.type) {
      case PKG_HANDSHAKE: return onHandshake(decodeJSON(p.body) || {});
      case PKG_HEARTBEAT:
        // Liveness was refreshed in onmessage. Also answer the server's beat
        // unless we sent something lately: timers of background tabs are
        // throttled, message events are not (a server that echoes our
        // heartbeats gets no answer to the echo, so there is no ping-pong).
        if (heartbeatMs && Date.now() - lastSent >= heartbeatMs / 2) send(PKG_HEARTBEAT);
        return;
      case PKG_DATA: return onData(p.body);
      case PKG_KICK: {
        const k = decodeJSON(p.body) || {};
        nm.emit('kick', k);
        nm.emit('onKick', k); // starx's name for the same event
        return;
      }
      default: return; // HandshakeAck is client -> server only
    }
  }

  function onHandshake(h) {
    if (h.code !== 200) {
      nm.emit('error', { code: h.code, message: h.message || 'handshake failed' });
      return; // the server closes the connection
    }
    const sys = h.sys || {};
    dict = sys.dict || {};
    codes = {};
    for (const r in dict) codes[dict[r]] = r;
    heartbeatMs = (sys.heartbeat || 0) * 1000;
    send(PKG_HANDSHAKE_ACK);
    ready = true;
    if (heartbeatMs) {
      heartbeatTimer = setInterval(function () { send(PKG_HEARTBEAT); }, heartbeatMs);
      armTimeout();
    }
    if (handshakeCallback) call(handshakeCallback, [h.user], 'handshakeCallback');
    if (initCallback) call(initCallback, [socket], 'init callback');
  }

  function onData(body) {
    let m;
    try {
      m = decodeMessage(body, codes);
      if (m.zlib) throw new Error('nanomesh: zlib-compressed data is not supported');
    } catch (e) {
      nm.emit('error', { code: 0, message: e.message });
      return;
    }
    const data = decodeJSON(m.data);
    if (m.type === MSG_RESPONSE) {
      const cb = callbacks[m.id];
      delete callbacks[m.id];
      if (cb) call(cb, [data], 'request callback for ' + m.id);
      if (m.error) nm.emit('error', data); // data is {code, message}
    } else if (m.type === MSG_PUSH) {
      nm.emit(m.route, data);
    }
  }

  // request sends a Request and calls cb with the decoded response (or the
  // {code, message} error object of an error response).
  nm.request = function (route, msg, cb) {
    if (typeof msg === 'function') { cb = msg; msg = {}; }
    const id = ++reqId;
    if (sendData(encodeMessage(MSG_REQUEST, id, route, encodeJSON(msg), dict)) && cb) callbacks[id] = cb;
    return id;
  };

  nm.notify = function (route, msg) {
    sendData(encodeMessage(MSG_NOTIFY, 0, route, encodeJSON(msg), dict));
  };

  nm.disconnect = function () {
    stopTimers();
    ready = false;
    for (const id in callbacks) delete callbacks[id];
    if (socket) {
      const ws = socket;
      socket = null;
      // Closing a socket that never opened also fires onclose, hence 'close'.
      if (ws.readyState <= 1) ws.close();
    }
  };

  nm.connected = function () { return ready && !!socket && socket.readyState === 1; };

  nm._codec = { encodePacket, PacketReader, encodeMessage, decodeMessage, writeVarint, readVarint,
                encodeJSON, decodeJSON };

  global.nanomesh = nm;
})(typeof window !== 'undefined' ? window : globalThis);
