/* The pages' own behaviour: signing in through navigator.id, signing out, copying keys, and the
   notifications of /me appearing without a reload. */
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

  // /me: waiting notifications appear (and go) without a reload. Nodes are built with textContent
  // and setAttribute only (never markup), and an action becomes a link only if it is http(s).
  function httpUrl(value) {
    if (typeof value !== "string") { return null; }
    try {
      var url = new URL(value);
      return (url.protocol === "http:" || url.protocol === "https:") ? value : null;
    } catch (e) { return null; }
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function notificationItem(note) {
    var id = String(note.id);
    var item = element("li");
    item.id = "notification-" + id;
    item.setAttribute("data-id", id);
    var body = element("div", "note");
    var head = element("div");
    head.appendChild(element("strong", "note-app", note.app));
    head.appendChild(document.createTextNode(" "));
    head.appendChild(element("span", "muted note-domain", note.domain));
    head.appendChild(document.createTextNode(" "));
    head.appendChild(element("span", "small note-when", note.when));
    body.appendChild(head);
    body.appendChild(element("p", "note-message", note.message));
    var href = httpUrl(note.action);
    if (href) {
      var link = element("a", "note-action", href);
      link.setAttribute("href", href);
      link.setAttribute("rel", "noopener noreferrer");
      link.setAttribute("target", "_blank");
      body.appendChild(link);
    }
    item.appendChild(body);
    var form = element("form");
    form.setAttribute("method", "post");
    form.setAttribute("action", "/me/dismiss");
    [["csrf", csrfToken()], ["id", id]].forEach(function (field) {
      var input = element("input");
      input.setAttribute("type", "hidden");
      input.setAttribute("name", field[0]);
      input.setAttribute("value", field[1]);
      form.appendChild(input);
    });
    var button = element("button", null, "Dismiss");
    button.setAttribute("type", "submit");
    button.id = "dismiss-" + id;
    form.appendChild(button);
    item.appendChild(form);
    return item;
  }

  function showNotifications(list, empty, notes) {
    var present = {};
    var wanted = {};
    notes = notes.filter(function (note) { return note && typeof note.id === "number"; });
    notes.forEach(function (note) { wanted[String(note.id)] = true; });
    Array.prototype.slice.call(list.children).forEach(function (item) {
      var id = item.getAttribute("data-id");
      if (wanted[id]) { present[id] = item; } else { list.removeChild(item); }
    });
    notes.forEach(function (note, i) {  // the ones shown keep their place; new ones go where they belong
      var item = present[String(note.id)] || notificationItem(note);
      if (list.children[i] !== item) { list.insertBefore(item, list.children[i] || null); }
    });
    list.hidden = notes.length === 0;
    empty.hidden = notes.length !== 0;
  }

  if (page === "me") {
    var list = document.getElementById("notifications");
    var empty = document.getElementById("no-notifications");
    var problem = document.getElementById("notifications-problem");
    var every = 4000;
    var delay = every;
    var poll = function () {
      if (document.hidden) { setTimeout(poll, every); return; }  // nothing to see: no request
      fetch("/me/notifications", {
        credentials: "same-origin", cache: "no-store", headers: { accept: "application/json" }
      }).then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (data) {
          if (!response.ok || !Array.isArray(data.notifications)) {
            var failure = new Error(data.error || ("Presence answered HTTP " + response.status));
            failure.status = response.status;
            throw failure;
          }
          showNotifications(list, empty, data.notifications);
          problem.hidden = true;
          delay = every;
          setTimeout(poll, delay);
        });
      }).catch(function (error) {
        problem.textContent = error.status ? error.message
          : "Could not reach Presence to check for new notifications; trying again.";
        problem.hidden = false;
        if (error.status === 401) { return; }  // signed out: no more polling
        delay = Math.min(delay * 2, 60000);
        setTimeout(poll, delay);
      });
    };
    if (list && empty && problem) { setTimeout(poll, every); }
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
