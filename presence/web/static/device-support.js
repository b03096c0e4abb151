/*
 * What the browser device (presence-device.js) stands on: small pure helpers (exported: the tests run
 * them in the browser), the identities Presence's sign-in pages (presence-id.js) keep in this
 * origin's IndexedDB, and signing an assertion with one. No state of its own.
 */

const DB_NAME = "presence-id";          // presence-id.js's database: the same name, version and store
const DB_STORE = "identities";
const MARGIN_MS = 60 * 1000;            // a certificate this close to its expiry is not used
const ASSERTION_MS = 2 * 60 * 1000;     // an assertion is valid two minutes
const DEVICE_KEY = "presence-device-id";

// -- small pure helpers (exported: the tests run them in the browser) -----------------------------

/** base64url without padding, of bytes (an ArrayBuffer or a typed array). */
export function b64url(bytes) {
  const view = new Uint8Array(bytes.buffer ? bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) : bytes);
  let text = "";
  for (let i = 0; i < view.length; i++) { text += String.fromCharCode(view[i]); }
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function b64urlJSON(value) { return b64url(new TextEncoder().encode(JSON.stringify(value))); }

/** The milliseconds to wait before reconnection attempt number `attempt` (0 first): "full jitter",
 *  a uniformly random time between 0 and min(max, base * 2^attempt). */
export function backoffDelay(attempt, baseMs, maxMs, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * Math.pow(2, Math.min(attempt, 30)));
  return Math.floor(random() * ceiling);
}

/** What a closed connection means, from its close code and the errno of the last refusal:
 *  "revoked" (4007, errno 16: the person revoked this device; stop), "signed-out" (4002: the
 *  assertion was refused; a new sign-in is needed), "replaced" (4000: this device connected again
 *  elsewhere, e.g. another tab; stop), or "retry" (anything else, errno 15 included: the node could
 *  not fetch a support document and says to try again later). */
export function closeOutcome(code, errno) {
  if (code === 4007 || errno === 16) { return "revoked"; }
  if (code === 4000) { return "replaced"; }
  if (code === 4002 && errno !== 15) { return "signed-out"; }
  return "retry";
}

/** The status to report: "online" while visible and input came within idleMs, else "unavailable". */
export function desiredStatus(visible, lastInputMs, nowMs, idleMs) {
  return visible && nowMs - lastInputMs < idleMs ? "online" : "unavailable";
}

/** `value` if it is an http(s) URL, else null (a notification's action becomes a link only then). */
export function httpUrl(value) {
  if (typeof value !== "string") { return null; }
  try {
    const url = new URL(value);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (e) {
    return null;
  }
}

/** A notification as the node sends it, checked: {id, app, domain, message, action, at} or null. */
export function cleanNotification(item) {
  if (!item || typeof item !== "object" || !Number.isInteger(item.id) || typeof item.message !== "string") {
    return null;
  }
  const text = (v) => (typeof v === "string" ? v : "");
  return { id: item.id, app: text(item.app), domain: text(item.domain), message: item.message,
           action: httpUrl(item.action), at: typeof item.at === "number" ? item.at : null };
}

/** The payload of a JWT-shaped certificate (its `exp` in milliseconds), or null. */
export function certificatePayload(certificate) {
  try {
    const part = String(certificate).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
  } catch (e) {
    return null;
  }
}

// -- the identities presence-id.js keeps (IndexedDB, this origin) --------------------------------

/** `withStore(mode, action)` for one IndexedDB object store of this origin: `action(store)` runs in a
 *  transaction, and its request's result is the promise's once the transaction completes. */
export function idbStore(dbName, storeName, keyPath) {
  const open = () => new Promise((resolve, reject) => {
    const request = indexedDB.open(dbName, 1);
    request.onupgradeneeded = () => { request.result.createObjectStore(storeName, { keyPath }); };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return async (mode, action) => {
    const db = await open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction(storeName, mode);
      const request = action(tx.objectStore(storeName));
      tx.oncomplete = () => { db.close(); resolve(request ? request.result : undefined); };
      tx.onerror = () => { db.close(); reject(tx.error); };
    });
  };
}

export const withStore = idbStore(DB_NAME, DB_STORE, "email");

/** The identities this browser holds for this origin whose certificate is still usable. */
export async function usableIdentities(now = Date.now()) {
  const all = (await withStore("readonly", (store) => store.getAll())) || [];
  return all.filter((identity) => identity.expires - MARGIN_MS > now);
}

/** A backed assertion (`<certificate>~<assertion>`) for `audience`, valid two minutes. */
export async function signAssertion(identity, audience, now = Date.now()) {
  const signingInput = b64urlJSON({ alg: "RS256" }) + "." + b64urlJSON({ aud: audience, iat: now, exp: now + ASSERTION_MS });
  const signature = await crypto.subtle.sign({ name: "RSASSA-PKCS1-v1_5" }, identity.privateKey,
                                             new TextEncoder().encode(signingInput));
  return identity.certificate + "~" + signingInput + "." + b64url(signature);
}

export function meta(name) {
  const element = typeof document !== "undefined" && document.querySelector(`meta[name="${name}"]`);
  return element ? element.content : "";
}

export function storedDeviceId(storage) {
  try {
    let id = storage.getItem(DEVICE_KEY);
    if (!id) {
      id = "browser-" + crypto.randomUUID();
      storage.setItem(DEVICE_KEY, id);
    }
    return id;
  } catch (e) {
    return "browser-" + crypto.randomUUID();   // storage refused: a device per page load
  }
}
