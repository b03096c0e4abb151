/*
 * Presence's browser device: an ES module (no build step, no third-party code) that makes a browser
 * tab one of the person's devices on a Presence node (docs/clients.md, "Browser"; the wire protocol
 * is docs/protocol.md, "Devices: /presence").
 *
 *   import { PresenceDevice } from "/static/presence-device.js";
 *   const device = new PresenceDevice();          // on a page the node serves: options from its <meta>s
 *   device.addEventListener("statechange", e => console.log(e.detail.state, e.detail.reason));
 *   device.start();
 *
 * Who the person is: the key and certificate Presence's own sign-in pages (presence-id.js) keep in
 * this origin's IndexedDB; the module signs a fresh assertion for the node's audience with that key
 * for every connection. Without one it reports "signed-out" and waits for one (signIn(email) sends
 * the one-time link). A page on another origin (option `node`: the node's public URL) pairs this
 * browser instead, with the person's consent in the node's popup (pairWithPopup(), from a click;
 * presence-pairing.js), or passes its own `assertion` function.
 *
 * What it reports: "online" while the page is visible and its user gave input (pointer, keyboard,
 * touch, wheel) within `idleSeconds`; "unavailable" once idle that long or as soon as the page is
 * hidden; "online" again at the next input or when the page shows again. Only changes are sent.
 *
 * Notifications: shown with the Notification API when permission is granted, acknowledged when the
 * browser reports them shown; without permission the page gets a `notification` event and
 * acknowledges with event.detail.ack() once it has shown the item itself.
 */

import { BrowserPairing } from "./presence-pairing.js";
import {
  backoffDelay, certificatePayload, cleanNotification, closeOutcome, desiredStatus, meta, signAssertion,
  storedDeviceId, usableIdentities, withStore,
} from "./device-support.js";

export { BrowserPairing, PairingError } from "./presence-pairing.js";
export {
  b64url, backoffDelay, certificatePayload, cleanNotification, closeOutcome, desiredStatus, httpUrl,
  signAssertion, usableIdentities,
} from "./device-support.js";

const KEY_ALGORITHM = { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048,
                        publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" };
const RENEW_WHEN_LEFT = 1 / 3;          // renew the certificate with a third of a day left
const CERT_LIFETIME_MS = 24 * 3600 * 1000;
const SEEN_LIMIT = 500;                 // notification ids remembered to drop duplicates
const SLOW_DOWN_MS = 1000;              // after errno 20 (the status was not applied), try again
const RETRY_WAIT_FOR_IDENTITY_MS = 3000;
const RENEW_CHECK_MS = 3600 * 1000;    // a paired browser looks whether its certificate needs renewing
const INPUT_EVENTS = ["pointerdown", "pointermove", "keydown", "touchstart", "wheel"];

// -- the device ---------------------------------------------------------------------------------

/**
 * Events (all CustomEvents, the facts in `detail`):
 *   statechange  {state, reason}: "signed-out" (waiting for a sign-in), "connecting", "connected",
 *                "waiting" (disconnected; `retryIn` ms until the next attempt), "revoked",
 *                "replaced" (another tab or window of this browser took over), "stopped"
 *   status       {status}: the node applied this status
 *   notification {notification, system, ack()}: one new notification; `system` says whether the
 *                module showed it with the Notification API (then it acknowledges it itself);
 *                otherwise the page shows it and calls ack()
 *   problem      {errno, error}: a refused request (the node's words)
 */
export class PresenceDevice extends EventTarget {
  constructor(options = {}) {
    super();
    const node = options.node || meta("presence-node") || location.origin;
    this.node = node.replace(/\/+$/, "");
    this.audience = options.audience || meta("presence-audience") || this.node;
    this.url = options.ws || meta("presence-ws");   // the node's websocket listener: <ws URL>/presence
    // On another origin than the node's: a browser paired through the node's popup (presence-pairing.js)
    const paired = options.paired ?? (!options.assertion && new URL(this.node).origin !== location.origin);
    this.pairing = paired ? new BrowserPairing(this.node) : null;
    if (!this.url && !this.pairing) { throw new Error("PresenceDevice needs the node's device websocket URL (option ws)"); }
    this.storage = options.storage || (typeof localStorage !== "undefined" ? localStorage : null);
    this.device = options.device || (this.pairing ? null : storedDeviceId(this.storage));   // paired: its name
    this.email = options.email || null;                 // which of this browser's identities; null: the first
    this.idleMs = (options.idleSeconds ?? 300) * 1000;
    this.retryBaseMs = (options.retryBaseSeconds ?? 1) * 1000;
    this.retryMaxMs = (options.retryMaxSeconds ?? 60) * 1000;
    this.systemNotifications = options.systemNotifications !== false;
    this.applicationIds = options.applicationIds || null;
    this.assertionSource = options.assertion || null;  // async (audience) => "<certificate>~<assertion>"
    this.state = "stopped";
    this.status = null;          // the status the node last applied
    this.identity = null;        // {email, certificate, expires} of the identity in use
    this.sessionId = null;
    this.connections = 0;        // successful connects so far
    this.socket = null;
    this._desired = null;
    this._sent = null;
    this._inFlight = false;
    this._replies = [];
    this._attempt = 0;
    this._timers = {};
    this._seen = new Set();
    this._refused = null;        // the certificate the node refused: not tried again
    this._refusal = null;        // the node's KO answer to connect, before it closes
    this._identityRecord = null; // the IndexedDB record in use (with its private key)
    this._connecting = false;
    this._lastInput = Date.now();  // loading the page counts as input
    this._onInput = () => this._input();
    this._onVisibility = () => {   // coming back to the page is the person's doing: it counts as input
      if (document.visibilityState === "visible") { this._lastInput = Date.now(); }
      this._update();
    };
    this._onOnline = () => { if (this.state === "waiting") { this._connectSoon(0); } };
    this._channel = null;
    this._tabs = null;
    this._onPageHide = () => this._gone();
  }

  // -- public --------------------------------------------------------------------------------------
  start() {
    if (this.state !== "stopped") { return; }
    for (const name of INPUT_EVENTS) { window.addEventListener(name, this._onInput, { capture: true, passive: true }); }
    document.addEventListener("visibilitychange", this._onVisibility);
    window.addEventListener("online", this._onOnline);
    if (typeof BroadcastChannel !== "undefined") {   // presence-id.js says when a link certified a key
      this._channel = new BroadcastChannel("presence-id");
      this._channel.onmessage = () => { if (this.state === "signed-out") { this._connectSoon(0); } };
      // Tabs of this browser are one device: the newest connection replaces the older (close 4000);
      // when the tab that took over goes away, a replaced one takes over again.
      this._tabs = new BroadcastChannel("presence-device");
      this._tabs.onmessage = (event) => {
        const message = event.data || {};
        if (message.type === "gone" && message.device === this.device && this.state === "replaced") {
          const delay = backoffDelay(0, this.retryBaseMs, this.retryMaxMs);
          this._setState("waiting", "the tab that took over was closed", { retryIn: delay });
          this._connectSoon(delay);
        }
      };
    }
    window.addEventListener("pagehide", this._onPageHide);
    this._lastInput = Date.now();
    if (this.pairing) {   // a device left open for weeks renews its month-long certificate in time
      this._renewal = setInterval(() => { if (this.pairing.renewalDue()) { this.pairing.renew().catch(() => {}); } },
                                  RENEW_CHECK_MS);
    }
    this._desired = this._compute();
    this._setState("connecting", "");
    this._connectSoon(0);
  }

  stop() {
    for (const name of INPUT_EVENTS) { window.removeEventListener(name, this._onInput, { capture: true }); }
    document.removeEventListener("visibilitychange", this._onVisibility);
    window.removeEventListener("online", this._onOnline);
    window.removeEventListener("pagehide", this._onPageHide);
    this._gone();
    if (this._channel) { this._channel.close(); this._channel = null; }
    if (this._tabs) { this._tabs.close(); this._tabs = null; }
    clearInterval(this._renewal);
    Object.keys(this._timers).forEach((name) => this._clear(name));
    this._setState("stopped", "stopped by the page");
    this._drop(1000);
  }

  /** Change the idle time (seconds) while running. */
  setIdleSeconds(seconds) {
    this.idleMs = seconds * 1000;
    this._update();
  }

  /** Ask the node for a one-time sign-in link for `email` (pages of the node's own origin only);
   *  the link's page lands on `next`. Answers the node's {email, via, minutes}. */
  async signIn(email, next = location.pathname) {
    const response = await fetch(this.node + "/login/start", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": await this._csrfToken() },
      body: JSON.stringify({ email, next }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { throw new Error(data.error || `Presence answered HTTP ${response.status}`); }
    this._connectSoon(0);
    return data;
  }

  /** The CSRF token of the node's pages, fresh (signing in in another tab changes it: the one in
   *  this page's <meta> may be out of date): read from a small page of the node. */
  async _csrfToken() {
    const response = await fetch(this.node + "/login/link", { credentials: "same-origin", cache: "no-store" });
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const element = page.querySelector('meta[name="csrf-token"]');
    return element ? element.content : meta("csrf-token");
  }

  /** Pair this browser with the node, the person approving in the node's popup (pages on another
   *  origin; call it from a click, or the browser blocks the popup). Resolves with {email, device}
   *  and connects; rejects with a PairingError (reason "denied", "closed", "blocked", "failed"). */
  async pairWithPopup(options = {}) {
    if (!this.pairing) { throw new Error("pairWithPopup is for pages on another origin than the node's"); }
    const record = await this.pairing.pairWithPopup(options);   // the popup opens before any await
    this._refused = null;
    if (this.state === "signed-out" || this.state === "revoked") {
      this._setState("connecting", "");
      this._connectSoon(0);
    }
    return { email: record.email, device: record.device };
  }

  /** Ask for permission to show notifications (call it from a click: browsers require a gesture). */
  async requestNotifications() {
    if (typeof Notification === "undefined") { return "unsupported"; }
    return Notification.requestPermission();
  }

  /** Have the node certify a new key for the identity in use, with the session of Presence's pages
   *  (POST /browserid/certify): a device left open for days keeps working while the person's
   *  session lasts. Called by itself when a third of the certificate's day is left. */
  async renewCertificate() {
    if (this.pairing) { return this._paired(await this.pairing.renew()); }
    const identity = this._identityRecord;
    if (!identity) { throw new Error("no identity to renew"); }
    const pair = await crypto.subtle.generateKey(KEY_ALGORITHM, false, ["sign", "verify"]);
    const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
    const response = await fetch(this.node + "/browserid/certify", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": await this._csrfToken() },
      body: JSON.stringify({ email: identity.email, publicKey: { kty: jwk.kty, n: jwk.n, e: jwk.e },
                             duration: CERT_LIFETIME_MS / 1000 }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { throw new Error(data.error || `Presence answered HTTP ${response.status}`); }
    const payload = certificatePayload(data.certificate) || {};
    const renewed = { email: identity.email, certificate: data.certificate,
                      expires: payload.exp || Date.now() + CERT_LIFETIME_MS, privateKey: pair.privateKey };
    await withStore("readwrite", (store) => { store.put(renewed); });
    this._identityRecord = renewed;
    this.identity = { email: renewed.email, certificate: renewed.certificate, expires: renewed.expires };
    return this.identity;
  }

  // -- the connection ------------------------------------------------------------------------------
  _connectSoon(delay) {
    this._clear("connect");
    this._timers.connect = setTimeout(() => { delete this._timers.connect; this._connect(); }, delay);
  }

  _paired(record) {
    this.identity = { email: record.email, certificate: record.certificate, expires: record.expires };
    this.device = record.device;   // the name the node gave it (as /me lists it)
    this.url = this.url || record.websocket;
    return this.identity;
  }

  async _assertion() {
    if (this.assertionSource) { return this.assertionSource(this.audience); }
    if (this.pairing) {
      const assertion = await this.pairing.assertion();   // rejects (revoked) if the node says so
      if (!assertion || this.pairing.record.certificate === this._refused) { return null; }
      this._paired(this.pairing.record);
      return assertion;
    }
    const known = await usableIdentities();
    const identity = known.filter((id) => (!this.email || id.email === this.email) && id.certificate !== this._refused)[0];
    if (!identity) { return null; }
    this._identityRecord = identity;
    this.identity = { email: identity.email, certificate: identity.certificate, expires: identity.expires };
    if (identity.expires - Date.now() < CERT_LIFETIME_MS * RENEW_WHEN_LEFT && this.node === location.origin) {
      try { await this.renewCertificate(); } catch (e) { /* no session: the certificate serves until it expires */ }
    }
    return signAssertion(this._identityRecord, this.audience);   // a fresh one for every connection
  }

  async _connect() {
    if (this._connecting || ["stopped", "revoked", "replaced", "connected"].includes(this.state)) { return; }
    this._connecting = true;
    let assertion;
    try {
      assertion = await this._assertion();
    } catch (e) {
      assertion = null;
      if (e && e.revoked) { this._lost(4007, 16, e.message); }   // a paired browser's renewal was refused
    } finally {
      this._connecting = false;
    }
    if (["stopped", "revoked", "replaced", "connected"].includes(this.state)) { return; }
    if (!assertion) {   // look again a little later, quietly: a link opened meanwhile signs this browser in
      if (this.state !== "signed-out") {
        this._setState("signed-out", this.pairing ? "this browser is not paired with the node: pairWithPopup()"
                                                   : "this browser holds no certificate for this node: sign in");
      }
      if (!this.assertionSource) { this._connectSoon(RETRY_WAIT_FOR_IDENTITY_MS); }
      return;
    }
    this._setState("connecting", "");
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (e) {
      this._lost(1006, null, String(e));
      return;
    }
    this.socket = socket;
    this._replies = [];
    this._sent = null;
    this._inFlight = false;
    this._refusal = null;
    socket.onopen = () => {
      const connect = { type: "connect", assertion, device: this.device || undefined };
      if (this.applicationIds) { connect.application_ids = this.applicationIds; }
      this._request(connect, (reply) => {
        if (reply.result !== true) {
          // Closed by the node for an assertion it refused (4002); a refusal it leaves open (errno
          // 50: its store did not answer) is closed here, so onclose decides: retry, revoked, signed out.
          this._refusal = reply;
          const closedByNode = reply.errno >= 10 && reply.errno <= 16;   // assertion refusals: 4002 follows
          if (!closedByNode) {
            try { socket.close(1000); } catch (e) { /* already closing */ }
          }
          return;
        }
        this._attempt = 0;
        this._refused = null;
        this.sessionId = reply.session_id;
        this.connections += 1;
        this._setState("connected", "");
        this._update();
      });
    };
    socket.onmessage = (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (message && message.type === "notifications") {
        this._notifications(Array.isArray(message.notifications) ? message.notifications : []);
      } else if (message && "result" in message) {
        const handler = this._replies.shift();
        if (message.result === "KO") {
          this._emit("problem", { errno: message.errno, error: message.error });
        }
        if (handler) { handler(message); }
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) { return; }
      this.socket = null;
      const refusal = this._refusal || {};
      this._lost(event.code, refusal.errno ?? null, refusal.error || event.reason || "");
    };
  }

  _lost(code, errno, reason) {
    this.sessionId = null;
    this._clear("slowDown");
    if (["stopped", "revoked", "replaced"].includes(this.state)) { return; }
    const outcome = closeOutcome(code, errno);
    if (outcome === "revoked") {
      if (this.pairing) { this.pairing.forget().catch(() => {}); }   // pairWithPopup() may pair it again
      this._setState("revoked", reason || "this device was revoked on /me");
    } else if (outcome === "replaced") {
      this._setState("replaced", "this browser's device connected again (another tab or window)");
    } else if (outcome === "signed-out") {
      this._refused = this.identity ? this.identity.certificate : null;   // wait for another one
      this._setState("signed-out", reason || "the node refused this browser's certificate");
      if (!this.assertionSource) { this._connectSoon(RETRY_WAIT_FOR_IDENTITY_MS); }
    } else {
      const delay = backoffDelay(this._attempt++, this.retryBaseMs, this.retryMaxMs);
      this._setState("waiting", reason || `connection closed (${code})`, { retryIn: delay, code });
      this._connectSoon(delay);
    }
  }

  _gone() {   // this tab stops being the device: another tab of this browser may take over
    if (this.state === "connected" && this._tabs) { this._tabs.postMessage({ type: "gone", device: this.device }); }
  }

  _drop(code) {
    const socket = this.socket;
    this.socket = null;
    if (socket) { try { socket.close(code); } catch (e) { /* already closing */ } }
  }

  _request(message, handler) {
    this._replies.push(handler || (() => {}));
    this.socket.send(JSON.stringify(message));
  }

  // -- status --------------------------------------------------------------------------------------
  _compute() {
    return desiredStatus(document.visibilityState === "visible", this._lastInput, Date.now(), this.idleMs);
  }

  _input() {
    this._lastInput = Date.now();
    if (this._desired !== "online" && document.visibilityState === "visible") { this._update(); }
  }

  _update() {
    this._desired = this._compute();
    this._clear("idle");
    if (this._desired === "online") {   // look again when the idle time would be up
      const left = this._lastInput + this.idleMs - Date.now();
      this._timers.idle = setTimeout(() => { delete this._timers.idle; this._update(); }, Math.max(left, 0) + 5);
    }
    this._flush();
  }

  _flush() {
    if (this.state !== "connected" || this._inFlight || this._timers.slowDown || this._desired === this._sent) { return; }
    const status = this._desired;
    const message = { type: "status", status };
    this._inFlight = true;
    this._request(message, (reply) => {
      this._inFlight = false;
      if (reply.result === "OK") {
        this._sent = status;
        this.status = status;
        this._emit("status", { status });
      } else if (reply.errno === 20) {   // slow down: not applied; send the latest later
        this._timers.slowDown = setTimeout(() => { delete this._timers.slowDown; this._flush(); }, SLOW_DOWN_MS);
        return;
      }
      this._flush();
    });
  }

  // -- notifications -------------------------------------------------------------------------------
  _notifications(items) {
    const again = [];
    for (const raw of items) {
      const note = cleanNotification(raw);
      if (!note) { continue; }
      if (this._seen.has(note.id)) { again.push(note.id); continue; }   // shown already: acknowledge again
      this._seen.add(note.id);
      if (this._seen.size > SEEN_LIMIT) { this._seen.delete(this._seen.values().next().value); }
      this._deliver(note);
    }
    if (again.length) { this._ack(again); }
  }

  _deliver(note) {
    let acked = false;
    const ack = () => { if (!acked) { acked = true; this._ack([note.id]); } };
    let system = false;
    if (this.systemNotifications && typeof Notification !== "undefined" && Notification.permission === "granted") {
      try {
        const shown = new Notification(note.app || note.domain || "Presence", {
          body: note.message, tag: "presence-" + note.id, data: { id: note.id, action: note.action },
        });
        shown.addEventListener("show", ack);
        // not shown after all (blocked by the system): not acknowledged; it comes again at the next connect
        shown.addEventListener("error", () => { if (!acked) { this._seen.delete(note.id); } });
        shown.addEventListener("click", () => {
          window.focus();
          if (note.action) { window.open(note.action, "_blank", "noopener,noreferrer"); }
          shown.close();
        });
        system = true;
      } catch (e) {
        system = false;   // e.g. Android Chrome allows only service-worker notifications
      }
    }
    this._emit("notification", { notification: note, system, ack });
  }

  _ack(ids) {
    if (this.state !== "connected" || !this.socket) { return; }   // the node sends it again at the next
                                                                   // connect; seen already, it is acknowledged then
    this._request({ type: "ack", ids });
  }

  // -- plumbing ------------------------------------------------------------------------------------
  _setState(state, reason, extra = {}) {
    this.state = state;
    this._emit("statechange", { state, reason, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _clear(name) {
    if (this._timers[name] !== undefined) { clearTimeout(this._timers[name]); delete this._timers[name]; }
  }
}
