/* The pages' own behaviour: signing in through navigator.id, signing out, copying keys. */
(function () {
  "use strict";

  function say(text, isError) {
    var message = document.getElementById("message");
    if (!message) { return; }
    message.hidden = false;
    message.textContent = text;
    message.className = "notice" + (isError ? " error" : " ok");
  }

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function signIn(next) {
    return function (assertion) {
      fetch("/login/assertion", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": csrfToken() },
        body: JSON.stringify({ assertion: assertion, next: next })
      }).then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (data) {
          if (!response.ok) { throw new Error(data.error || ("Presence answered HTTP " + response.status)); }
          location.assign(data.next || next);
        });
      }).catch(function (error) { say(error.message, true); });
    };
  }

  var page = document.body.getAttribute("data-page");

  if (page === "login") {
    var next = document.getElementById("login").getAttribute("data-next") || "/";
    navigator.id.watch({ loggedInUser: null, onlogin: signIn(next), onlogout: function () {} });
    document.getElementById("signin").addEventListener("click", function () {
      navigator.id.request({ siteName: "Presence", returnTo: next }).catch(function (e) { say(e.message, true); });
    });
  }

  if (page === "link") {
    var token = location.hash.slice(1);
    var button = document.getElementById("finish");
    var target = "/";
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
    navigator.id.watch({ loggedInUser: null, onlogin: function (a) { signIn(target)(a); } });
    if (!token) {
      button.disabled = true;
      say("This link is incomplete: open the whole link from the mail (or the node's log).", true);
    }
    button.addEventListener("click", function () {
      button.disabled = true;
      navigator.id.provisionFromLink(token).then(function (data) {
        target = data.next || "/";
        return navigator.id.request({ email: data.email, returnTo: target });
      }).catch(function (e) { say(e.message, true); });
    });
  }

  // Signing out also makes this browser forget its key for the address.
  Array.prototype.forEach.call(document.querySelectorAll("form.logout"), function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var done = function () { form.submit(); };
      navigator.id.logout(form.elements.email.value).then(done, done);
    });
  });

  Array.prototype.forEach.call(document.querySelectorAll("button.copy"), function (button) {
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      field.select();
      navigator.clipboard.writeText(field.value).then(function () { button.textContent = "Copied"; },
                                                      function () { document.execCommand("copy"); });
    });
  });
})();
