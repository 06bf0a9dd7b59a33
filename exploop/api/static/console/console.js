/* Exploop admin console: live refresh, countdowns, confirmations. No inline script anywhere
   (the Content-Security-Policy forbids it); the server renders and escapes every value. */
(function () {
  "use strict";
  var refreshMs = parseInt(document.body.dataset.refreshMs, 10) || 2000;

  // Confirm before any action whose form says so.
  document.addEventListener("submit", function (event) {
    var message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  // Lease TTLs count down between refreshes.
  window.setInterval(function () {
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var left = Math.max(0, parseInt(el.dataset.countdown, 10) - 1);
      el.dataset.countdown = String(left);
      el.textContent = String(left);
    });
  }, 1000);

  // Live regions: one request per interval per page, whatever the fleet size (the server
  // renders one page of rows). A page whose session ended reloads to the sign-in form.
  var live = document.querySelector("[data-live]");
  if (!live) {
    return;
  }
  var state = document.getElementById("live-state");
  var busy = false;
  function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    fetch(live.dataset.live, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (response.status === 401 || response.redirected) {
          window.location.reload();
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        if (html !== null) {
          live.innerHTML = html;  // server-rendered, every value escaped by Jinja2
          live.dataset.refreshedAt = String(Date.now());
          if (state) { state.textContent = ""; }
        }
      })
      .catch(function (error) {
        if (state) { state.textContent = "refresh failed (" + error.message + "), retrying"; }
      })
      .finally(function () { busy = false; });
  }
  window.setInterval(refresh, refreshMs);
})();
