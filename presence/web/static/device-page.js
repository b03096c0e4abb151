/* /device: the page around presence-device.js (the module does the work; this shows what it says).
   Options in the page's address: ?idle=SECONDS (default 300) before "unavailable", ?retry=SECONDS
   (default 60) the longest wait between reconnection attempts. Nodes are built with textContent and
   setAttribute only, never markup. */
import { PresenceDevice } from "/static/presence-device.js";

const params = new URLSearchParams(location.search);
const seconds = (name, fallback) => {
  const value = Number(params.get(name));
  return Number.isFinite(value) && value > 0 ? value : fallback;
};
const device = new PresenceDevice({ idleSeconds: seconds("idle", 300), retryMaxSeconds: seconds("retry", 60) });
window.presenceDevice = device;   // for people debugging, and the tests

const $ = (id) => document.getElementById(id);
const MAX_SHOWN = 100;   // notifications listed on the page at most (the oldest go first)
const STATES = {
  "signed-out": "signed out", connecting: "connecting…", connected: "connected", waiting: "disconnected, retrying",
  revoked: "revoked on /me: this browser no longer reports your status", replaced: "running in another tab",
  stopped: "stopped",
};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) { node.className = className; }
  if (text !== undefined && text !== null) { node.textContent = String(text); }
  return node;
}

function showPermission() {
  const permission = typeof Notification === "undefined" ? "unsupported" : Notification.permission;
  $("device-enable-notifications").hidden = permission !== "default";
  $("device-permission").textContent = {
    granted: "Notifications show on this computer, and are acknowledged once shown.",
    denied: "This browser blocks notifications from Presence: they appear on this page only.",
    default: "Notifications appear on this page; they can show on this computer too.",
    unsupported: "This browser cannot show notifications: they appear on this page only.",
  }[permission];
}

device.addEventListener("statechange", (event) => {
  const { state, reason } = event.detail;
  const el = $("device-state");
  el.textContent = STATES[state] || state;
  el.setAttribute("data-state", state);
  $("device-reason").textContent = reason && state !== "connected" ? `(${reason})` : "";
  $("device-signin").hidden = state !== "signed-out";
  $("device-take-over").hidden = state !== "replaced";
  if (device.identity) {
    $("device-who").hidden = false;
    $("device-email").textContent = device.identity.email;
  }
  if (state !== "connected") {
    const badge = $("device-status");
    badge.textContent = "offline";
    badge.className = "badge offline";
  }
});

device.addEventListener("status", (event) => {
  const badge = $("device-status");
  badge.textContent = event.detail.status;
  badge.className = "badge " + event.detail.status;
});

device.addEventListener("notification", (event) => {
  const { notification: note, system, ack } = event.detail;
  const item = element("li");
  item.id = "device-notification-" + note.id;
  item.setAttribute("data-id", String(note.id));
  item.setAttribute("data-system", system ? "yes" : "no");
  const body = element("div", "note");
  const head = element("div");
  head.appendChild(element("strong", "note-app", note.app));
  head.appendChild(document.createTextNode(" "));
  head.appendChild(element("span", "muted note-domain", note.domain));
  body.appendChild(head);
  body.appendChild(element("p", "note-message", note.message));
  if (note.action) {
    const link = element("a", "note-action", note.action);
    link.setAttribute("href", note.action);
    link.setAttribute("rel", "noopener noreferrer");
    link.setAttribute("target", "_blank");
    body.appendChild(link);
  }
  item.appendChild(body);
  const list = $("device-notifications");
  list.insertBefore(item, list.firstChild);
  while (list.children.length > MAX_SHOWN) { list.removeChild(list.lastChild); }   // a tab open for weeks
  list.hidden = false;
  $("device-no-notifications").hidden = true;
  if (!system) { ack(); }   // shown here, on the page: acknowledged
});

$("device-signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const message = $("device-message");
  const send = $("device-signin-send");
  send.disabled = true;
  device.signIn($("device-signin-email").value, location.pathname + location.search).then((data) => {
    message.className = "notice ok";
    message.textContent = data.via === "mail"
      ? `We sent a one-time sign-in link to ${data.email}. Open it in this browser within ${data.minutes} minutes.`
      : `This Presence node has no mail server, so your one-time link for ${data.email} was written to the node's log: ` +
        `ask its operator, then open the link in this browser within ${data.minutes} minutes.`;
  }, (error) => {
    message.className = "notice error";
    message.textContent = error.message;
  }).then(() => { message.hidden = false; send.disabled = false; });
});

$("device-enable-notifications").addEventListener("click", () => {
  device.requestNotifications().then(showPermission, showPermission);
});

$("device-take-over").addEventListener("click", () => location.reload());

showPermission();
device.start();
