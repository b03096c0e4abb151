/* /pair/browser: the popup where the signed-in person lets a page of another origin pair this browser
   as one of their devices (presence-pairing.js opens it; docs/clients.md, "Browser").

   The asking origin is the browser's event.origin of the opener's message, never a parameter; the
   answer (a certificate for the page's key) is posted to that exact origin only. The page tells its
   opener it is ready (nothing secret), shows the origin, and only a click on Approve pairs. */
(function () {
  "use strict";
  var CLICK_DELAY_MS = 700;   // Approve waits a moment: no click meant for the opener lands on it
  var request = null;         // {origin, source, publicKey, name}: the first request, the only one
  var $ = function (id) { return document.getElementById(id); };

  function say(text, isError) {
    var message = $("message");
    message.hidden = false;
    message.textContent = text;
    message.className = "notice" + (isError ? " error" : " ok");
  }

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function httpOrigin(origin) {
    return typeof origin === "string" && /^https?:\/\/[^/?#]+$/.test(origin);
  }

  function answer(message) {   // to the asking page, at the origin the person saw, and nowhere else
    try { request.source.postMessage(message, request.origin); } catch (e) { /* the page went away */ }
  }

  function finish(text, isError) {
    $("pair-approve").disabled = true;
    $("pair-deny").disabled = true;
    say(text, isError);
    setTimeout(function () { window.close(); }, isError ? 4000 : 300);
  }

  function onMessage(event) {
    var data = event.data;
    if (request || event.source !== window.opener || !data || typeof data !== "object" || data.type !== "presence-pair") {
      return;
    }
    if (!httpOrigin(event.origin)) {
      say("Only a page on an http(s) origin can pair this browser.", true);
      return;
    }
    if (!data.publicKey || typeof data.publicKey !== "object") { return; }
    var name = typeof data.name === "string" ? data.name.replace(/\s+/g, " ").trim().slice(0, 64) : "";
    request = { origin: event.origin, source: event.source, publicKey: data.publicKey, name: name || null };
    $("pair-origin").textContent = event.origin;
    $("pair-origin-again").textContent = event.origin;
    $("pair-name").textContent = event.origin.split("://")[1] + " (" + (name || "browser") + ")";
    $("pair-waiting").hidden = true;
    $("pair-consent").hidden = false;
    setTimeout(function () { $("pair-approve").disabled = false; }, CLICK_DELAY_MS);
  }

  function approve() {
    $("pair-approve").disabled = true;
    fetch("/pair/browser", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": csrfToken() },
      body: JSON.stringify({ publicKey: request.publicKey, origin: request.origin, name: request.name })
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) {
          throw new Error(data.error_description || data.error || ("Presence answered HTTP " + response.status));
        }
        var message = { type: "presence-paired" };
        Object.keys(data).forEach(function (k) { message[k] = data[k]; });
        answer(message);
        finish("Paired as " + data.device + ". This window closes.", false);
      });
    }).catch(function (error) {
      answer({ type: "presence-failed", error: error.message });
      finish(error.message, true);
    });
  }

  if (!window.opener) {
    $("pair-waiting-text").textContent = "This window pairs a browser for a page that opened it; nothing opened it.";
    return;
  }
  $("pair-approve").addEventListener("click", approve);
  $("pair-deny").addEventListener("click", function () {
    if (request) { answer({ type: "presence-denied" }); }
    finish("Denied. This window closes.", false);
  });
  window.addEventListener("message", onMessage);
  window.opener.postMessage({ type: "presence-ready" }, "*");   // nothing secret: "send your request"
})();
