/*
 * Presence's BrowserID provisioning and authentication pages, for a standard BrowserID client: the
 * client's dialog opens them and supplies navigator.id.beginProvisioning, genKeyPair,
 * registerCertificate, raiseProvisioningFailure (provisioning, in a hidden frame) and
 * beginAuthentication, completeAuthentication (authentication). Presence's own pages do not need
 * them (presence-id.js); these exist so that other implementations can use Presence as their
 * identity provider.
 */
(function () {
  "use strict";

  function say(text, isError) {
    var message = document.getElementById("message");
    message.hidden = false;
    message.textContent = text;
    message.className = "notice" + (isError ? " error" : "");
  }

  function post(url, body) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": meta ? meta.content : "" },
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) { throw new Error(data.error || ("Presence answered HTTP " + response.status)); }
        return data;
      });
    });
  }

  function missing(names) {
    var id = navigator.id || {};
    return names.filter(function (name) { return typeof id[name] !== "function"; });
  }

  function provision(section) {
    var absent = missing(["beginProvisioning", "genKeyPair", "registerCertificate", "raiseProvisioningFailure"]);
    if (absent.length) {
      say("This page is for a BrowserID client, which supplies navigator.id." + absent.join(", navigator.id.") + ".", true);
      return;
    }
    navigator.id.beginProvisioning(function (email, certDuration) {
      var user = section.dataset.user;
      if (!user || user !== String(email).toLowerCase()) {
        say("Not signed in to Presence as " + email + ".", true);
        navigator.id.raiseProvisioningFailure("user is not authenticated as target user");
        return;
      }
      navigator.id.genKeyPair(function (publicKey) {
        var key = typeof publicKey === "string" ? JSON.parse(publicKey) : publicKey;
        post("/browserid/certify", { email: email, publicKey: key, duration: certDuration }).then(function (data) {
          say("Certified a key for " + data.email + ".");
          navigator.id.registerCertificate(data.certificate);
        }, function (error) {
          say(error.message, true);
          navigator.id.raiseProvisioningFailure(error.message);
        });
      });
    });
  }

  function authenticate(section) {
    var absent = missing(["beginAuthentication", "completeAuthentication"]);
    if (absent.length) {
      say("This page is for a BrowserID client, which supplies navigator.id." + absent.join(", navigator.id.") + ".", true);
      return;
    }
    navigator.id.beginAuthentication(function (email) {
      var user = section.dataset.user;
      if (user && user === String(email).toLowerCase()) {
        navigator.id.completeAuthentication();
        return;
      }
      var send = document.getElementById("send");
      var cancel = document.getElementById("cancel");
      send.hidden = false;
      send.textContent = "Email a sign-in link to " + email;
      send.addEventListener("click", function () {
        send.disabled = true;
        post("/login/start", { email: email, next: "/browserid/sign_in" }).then(function (data) {
          say(data.via === "mail"
            ? "A one-time link went to " + data.email + ": open it in this browser within " + data.minutes + " minutes."
            : "This node has no mail server: the one-time link for " + data.email + " is in the node's log." +
              " Open it in this browser within " + data.minutes + " minutes.");
        }, function (error) { say(error.message, true); }).then(function () { send.disabled = false; });
      });
      if (typeof navigator.id.cancelAuthentication === "function") {
        cancel.hidden = false;
        cancel.addEventListener("click", function () { navigator.id.cancelAuthentication(); });
      }
    });
  }

  function start() {
    var section = document.getElementById("provision");
    if (section) { provision(section); return; }
    section = document.getElementById("authenticate");
    if (section) { authenticate(section); }
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
