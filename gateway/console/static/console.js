// Switchboard console: small progressive enhancement. Every page works without it.
// - [data-refresh]: re-fetch the element's live part every data-every-s seconds (the overview's last hour,
//   the backends' live table); paused while the tab is hidden.
// - form[data-confirm]: ask before a destructive write (revoke).
// - [data-select-on-focus]: select a new key's text so it can be copied at once.
"use strict";
(function () {
  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var every = parseFloat(el.getAttribute("data-every-s") || "15") * 1000;
    setInterval(function () {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", headers: { "accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { el.innerHTML = html; } })
        .catch(function () { /* keep the last view; the next tick retries */ });
    }, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
    document.querySelectorAll("[data-select-on-focus]").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  });
})();
