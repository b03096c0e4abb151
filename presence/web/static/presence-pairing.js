/*
 * Pairing a browser on another origin (an application's page) with a Presence node, with the
 * person's consent in the node's popup (docs/clients.md, "Browser: pages on another origin").
 * presence-device.js uses it when its `node` is not the page's origin; it works alone too:
 *
 *   import { BrowserPairing } from "https://presence.example/static/presence-pairing.js";
 *   const pairing = new BrowserPairing("https://presence.example");
 *   button.onclick = () => pairing.pairWithPopup({ name: "chat" });   // from a click: a popup
 *   const assertion = await pairing.assertion();                       // for every connection
 *
 * The key (WebCrypto RSASSA-PKCS1-v1_5, SHA-256, 2048 bits, private half not extractable) and the
 * certificate the node gives it are kept in this origin's IndexedDB ("presence-device"), one per
 * node. The certificate names the pairing (revoked on the person's /me page) and lasts a month;
 * it is renewed with POST <node>/pair/renew when a third of it is left.
 */

import { idbStore, signAssertion } from "./device-support.js";

const DB_NAME = "presence-device";
const DB_STORE = "pairings";
const KEY_ALGORITHM = { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048,
                        publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" };
const MARGIN_MS = 60 * 1000;            // a certificate this close to its expiry is not used
const RENEW_WHEN_LEFT = 1 / 3;          // renew with a third of the certificate's life left
const POPUP_FEATURES = "popup,width=520,height=680";
const ANSWER_FIELDS = ["email", "device", "pairing", "certificate", "expires", "audience", "websocket"];

/** The error of a pairing the person revoked (`revoked` is true), or of a refused pairing. */
export class PairingError extends Error {
  constructor(message, reason) {
    super(message);
    this.reason = reason;   // "revoked", "denied", "closed", "blocked", "failed"
    this.revoked = reason === "revoked";
  }
}

const withStore = idbStore(DB_NAME, DB_STORE, "node");

/** Whether the answer the popup posted has the fields of /pair/token's. */
export function pairedAnswer(data) {
  return !!data && typeof data === "object" && typeof data.certificate === "string" && typeof data.email === "string"
    && typeof data.expires === "number" && typeof data.websocket === "string" && typeof data.audience === "string";
}

export class BrowserPairing {
  /** `node`: the node's public URL (its pages' origin). */
  constructor(node) {
    this.node = String(node).replace(/\/+$/, "");
    this.origin = new URL(this.node).origin;
    this.record = null;   // {node, email, device, pairing, certificate, expires, audience, websocket, issued, privateKey}
  }

  /** The stored pairing with this node (null if none, or its certificate expired). */
  async load() {
    const record = await withStore("readonly", (store) => store.get(this.node));
    this.record = record && record.expires - MARGIN_MS > Date.now() ? record : null;
    return this.record;
  }

  /** Forget the key and certificate (after a revocation, or to pair again). */
  async forget() {
    this.record = null;
    await withStore("readwrite", (store) => { store.delete(this.node); });
  }

  /** Open the node's popup (call it from a click: browsers block popups otherwise), make a key, and
   *  resolve with the stored pairing once the person approved; reject with a PairingError
   *  ("denied", "closed", "blocked", "failed"). `name` labels the device: "<host> (<name>)". */
  pairWithPopup({ name = null, features = POPUP_FEATURES } = {}) {
    const popup = window.open(this.node + "/pair/browser", "presence-pair", features);   // before any await
    if (!popup) { return Promise.reject(new PairingError("the browser blocked the pairing popup", "blocked")); }
    const keys = crypto.subtle.generateKey(KEY_ALGORITHM, false, ["sign", "verify"]);
    return new Promise((resolve, reject) => {
      let done = false;
      let answered = false;
      const end = (error, value) => {
        if (done) { return; }
        done = true;
        window.removeEventListener("message", onMessage);
        clearInterval(watch);
        if (error) { reject(error); } else { resolve(value); }
      };
      const onMessage = async (event) => {
        if (event.source !== popup || event.origin !== this.origin || !event.data || typeof event.data !== "object") {
          return;   // only the node's popup speaks here
        }
        const data = event.data;
        try {
          if (data.type === "presence-ready") {   // (again after signing in): send the request
            const pair = await keys;
            const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
            popup.postMessage({ type: "presence-pair", publicKey: { kty: jwk.kty, n: jwk.n, e: jwk.e }, name },
                              this.origin);
          } else if (data.type === "presence-paired" && pairedAnswer(data)) {
            answered = true;   // the popup closes now: that is not a refusal
            const record = { node: this.node, issued: Date.now(), privateKey: (await keys).privateKey };
            for (const field of ANSWER_FIELDS) { record[field] = data[field]; }
            await withStore("readwrite", (store) => { store.put(record); });
            this.record = record;
            end(null, record);
          } else if (data.type === "presence-denied") {
            end(new PairingError("the person denied pairing this browser", "denied"));
          } else if (data.type === "presence-failed") {
            end(new PairingError(String(data.error || "pairing failed"), "failed"));
          }
        } catch (e) {
          end(new PairingError(String(e && e.message || e), "failed"));
        }
      };
      window.addEventListener("message", onMessage);
      const watch = setInterval(() => {
        if (popup.closed && !answered) { setTimeout(() => end(new PairingError("the pairing window was closed", "closed")), 200); }
      }, 300);
    });
  }

  /** A backed assertion (`<certificate>~<assertion>`) for the node's audience, valid two minutes,
   *  after renewing the certificate if a third of its life is left; null if not paired. Rejects
   *  with a PairingError whose `revoked` is true if the person revoked the pairing. */
  async assertion() {
    const record = this.record || await this.load();
    if (!record) { return null; }
    if (this.renewalDue()) {
      try {
        await this.renew();
      } catch (e) {
        if (e.revoked) { throw e; }   // otherwise (the node unreachable...): the certificate serves on
      }
    }
    return this._sign(this.record);
  }

  /** Whether the certificate has a third of its life left, or less. */
  renewalDue(now = Date.now()) {
    const r = this.record;
    return !!r && r.expires - now < (r.expires - (r.issued || now)) * RENEW_WHEN_LEFT;
  }

  /** A fresh certificate for the same key (POST <node>/pair/renew, no cookie). */
  async renew() {
    const record = this.record || await this.load();
    if (!record) { throw new PairingError("this browser is not paired with " + this.node, "failed"); }
    const response = await fetch(this.node + "/pair/renew", {
      method: "POST", credentials: "omit", headers: { "content-type": "application/json" },
      body: JSON.stringify({ assertion: await this._sign(record) }),
    });
    const data = await response.json().catch(() => ({}));
    if (response.status === 403 && data.error === "revoked") {
      await this.forget();
      throw new PairingError(data.error_description || "this browser's pairing was revoked", "revoked");
    }
    if (!response.ok || !pairedAnswer(data)) {
      throw new PairingError(data.error_description || `Presence answered HTTP ${response.status}`, "failed");
    }
    const renewed = { ...record, issued: Date.now() };
    for (const field of ANSWER_FIELDS) { renewed[field] = data[field]; }
    await withStore("readwrite", (store) => { store.put(renewed); });
    this.record = renewed;
    return renewed;
  }

  _sign(record) {
    return signAssertion(record, record.audience);   // the record holds the certificate and the key
  }
}
