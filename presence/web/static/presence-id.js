/*
 * Presence's navigator.id: the BrowserID API shape (watch, request, logout) served by Presence
 * itself, since Mozilla's Persona (and its include.js) closed in 2016. No third-party script.
 *
 * The browser keeps, per email address, an RSA key made with WebCrypto (RSASSA-PKCS1-v1_5, SHA-256,
 * 2048 bits, the private half not extractable) and the certificate Presence's identity provider
 * gave it, in IndexedDB. request() signs a backed assertion for the page's origin with it and hands
 * it to the watcher's onlogin; without a usable certificate it asks for the address and Presence
 * sends a one-time link, whose page calls provisionFromLink() to have a new key certified.
 */
(function () {
  "use strict";
  if (navigator.id && navigator.id.presence) { return; }

  var DB_NAME = "presence-id";
  var STORE = "identities";
  var KEY_ALGORITHM = { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048,
                        publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" };
  var MARGIN_MS = 60 * 1000;        // a certificate this close to expiry is not used
  var ASSERTION_MS = 2 * 60 * 1000; // an assertion is valid two minutes

  function b64url(bytes) {
    var text = "";
    bytes = new Uint8Array(bytes);
    for (var i = 0; i < bytes.length; i++) { text += String.fromCharCode(bytes[i]); }
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function b64urlJSON(value) {
    return b64url(new TextEncoder().encode(JSON.stringify(value)));
  }

  // -- the browser's identities (IndexedDB) ---------------------------------------------------
  function openDB() {
    return new Promise(function (resolve, reject) {
      var request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = function () { request.result.createObjectStore(STORE, { keyPath: "email" }); };
      request.onsuccess = function () { resolve(request.result); };
      request.onerror = function () { reject(request.error); };
    });
  }

  function withStore(mode, action) {
    return openDB().then(function (db) {
      return new Promise(function (resolve, reject) {
        var tx = db.transaction(STORE, mode);
        var result = action(tx.objectStore(STORE));
        tx.oncomplete = function () { db.close(); resolve(result && "result" in result ? result.result : undefined); };
        tx.onerror = function () { db.close(); reject(tx.error); };
      });
    });
  }

  function identities() {
    return withStore("readonly", function (store) { return store.getAll(); }).then(function (all) {
      var now = Date.now();
      var usable = (all || []).filter(function (id) { return id.expires - MARGIN_MS > now; });
      var stale = (all || []).filter(function (id) { return usable.indexOf(id) < 0; });
      if (stale.length) {
        withStore("readwrite", function (store) { stale.forEach(function (id) { store.delete(id.email); }); });
      }
      return usable;
    });
  }

  function forget(email) {
    return withStore("readwrite", function (store) { return email ? store.delete(email) : store.clear(); });
  }

  // -- talking to Presence ----------------------------------------------------------------------
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": csrfToken() },
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) { throw new Error(data.error || ("Presence answered HTTP " + response.status)); }
        return data;
      });
    });
  }

  function assertionFor(identity, audience) {
    var now = Date.now();
    var signingInput = b64urlJSON({ alg: "RS256" }) + "." +
                       b64urlJSON({ aud: audience, iat: now, exp: now + ASSERTION_MS });
    return crypto.subtle.sign({ name: "RSASSA-PKCS1-v1_5" }, identity.privateKey,
                              new TextEncoder().encode(signingInput)).then(function (signature) {
      return identity.certificate + "~" + signingInput + "." + b64url(signature);
    });
  }

  // -- the watcher and the dialog -----------------------------------------------------------------
  var watcher = {};

  function logIn(identity) {
    return assertionFor(identity, location.origin).then(function (assertion) {
      if (typeof watcher.onlogin === "function") { watcher.onlogin(assertion); }
      return assertion;
    });
  }

  function element(tag, attributes, text) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (name) { node.setAttribute(name, attributes[name]); });
    if (text) { node.textContent = text; }
    return node;
  }

  function showDialog(options, known) {
    var dialog = element("dialog", { "class": "presence-id", "aria-labelledby": "presence-id-title" });
    dialog.appendChild(element("h2", { id: "presence-id-title" }, "Sign in to " + (options.siteName || location.host)));
    if (known.length) {
      var choices = element("div", { "class": "choices" });
      choices.appendChild(element("p", {}, "Continue as:"));
      known.forEach(function (identity) {
        var button = element("button", { type: "button", "class": "primary" }, identity.email);
        button.addEventListener("click", function () { dialog.close(); logIn(identity); });
        choices.appendChild(button);
      });
      dialog.appendChild(choices);
    }
    var form = element("form", { method: "dialog" });
    form.appendChild(element("label", { "for": "presence-id-email" }, known.length ? "Or another email address" : "Your email address"));
    var input = element("input", { type: "email", id: "presence-id-email", name: "email", required: "required",
                                   autocomplete: "email", placeholder: "you@example.com" });
    form.appendChild(input);
    var row = element("div", { "class": "row" });
    var send = element("button", { type: "submit", "class": "primary", id: "presence-id-send" }, "Email me a sign-in link");
    var cancel = element("button", { type: "button", id: "presence-id-cancel" }, "Cancel");
    row.appendChild(send);
    row.appendChild(cancel);
    form.appendChild(row);
    dialog.appendChild(form);
    var message = element("p", { "class": "message notice", id: "presence-id-message", role: "status" });
    message.hidden = true;
    dialog.appendChild(message);

    function say(text, isError) {
      message.hidden = false;
      message.textContent = text;
      message.className = "message notice" + (isError ? " error" : " ok");
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      send.disabled = true;
      post("/login/start", { email: input.value, next: options.returnTo || "/" }).then(function (data) {
        if (data.via === "mail") {
          say("We sent a one-time sign-in link to " + data.email + ". Open it in this browser within " +
              data.minutes + " minutes.");
        } else {
          say("This Presence node has no mail server, so your one-time link for " + data.email +
              " was written to the node's log: ask its operator, then open the link in this browser within " +
              data.minutes + " minutes.");
        }
      }, function (error) { say(error.message, true); }).then(function () { send.disabled = false; });
    });
    cancel.addEventListener("click", function () {
      dialog.close();
      if (typeof options.oncancel === "function") { options.oncancel(); }
    });
    dialog.addEventListener("close", function () { dialog.remove(); });
    document.body.appendChild(dialog);
    dialog.showModal();
    input.focus();
  }

  navigator.id = {
    presence: true,

    /* watch({loggedInUser, onlogin(assertion), onlogout(), onready()}) */
    watch: function (options) {
      watcher = options || {};
      if (typeof watcher.onready === "function") { setTimeout(watcher.onready, 0); }
    },

    /* request({siteName, returnTo, email, oncancel}): sign in, asking for an address if needed. */
    request: function (options) {
      options = options || {};
      return identities().then(function (known) {
        var chosen = known.filter(function (id) { return id.email === options.email; })[0];
        if (chosen) { return logIn(chosen); }
        showDialog(options, known);
      });
    },

    /* logout([email]): this browser forgets the key for the address (all of them without one). */
    logout: function (email) {
      return forget(email).then(function () {
        if (typeof watcher.onlogout === "function") { watcher.onlogout(); }
      });
    },

    /* Presence's identity provider: exchange a one-time link's token for a certified key. */
    provisionFromLink: function (token) {
      if (!window.crypto || !crypto.subtle) {
        return Promise.reject(new Error("This browser offers no WebCrypto here: sign-in needs https (or localhost)."));
      }
      return crypto.subtle.generateKey(KEY_ALGORITHM, false, ["sign", "verify"]).then(function (pair) {
        return crypto.subtle.exportKey("jwk", pair.publicKey).then(function (jwk) {
          return post("/login/certify", { token: token, publicKey: { kty: jwk.kty, n: jwk.n, e: jwk.e } });
        }).then(function (data) {
          var identity = { email: data.email, certificate: data.certificate, expires: data.expires,
                           privateKey: pair.privateKey };
          return withStore("readwrite", function (store) { store.put(identity); }).then(function () {
            // a browser device waiting in another tab of this origin (presence-device.js) connects now
            if (typeof BroadcastChannel !== "undefined") {
              var channel = new BroadcastChannel("presence-id");
              channel.postMessage({ type: "certified", email: data.email });
              channel.close();
            }
            return data;
          });
        });
      });
    }
  };
})();
