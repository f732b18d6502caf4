// The overview refreshes its counts by polling /api/overview (the server caches them, so
// any number of tabs costs the broker one query per listener every 5 s).
(function () {
  "use strict";
  var table = document.getElementById("overview");
  var freshness = document.getElementById("freshness");
  if (!table || !freshness) return;
  var every = (parseInt(freshness.getAttribute("data-refresh"), 10) || 3) * 1000;

  function show(value) { return value === null || value === undefined ? "-" : String(value); }

  function update(listeners) {
    listeners.forEach(function (row) {
      var tr = table.querySelector('tr[data-queue="' + CSS.escape(row.queue) + '"]');
      if (!tr) return;
      ["ready", "unacked", "consumers", "waiting_retry", "delayed", "parked"].forEach(function (field) {
        var cell = tr.querySelector('[data-field="' + field + '"]');
        if (!cell) return;
        var link = cell.querySelector("a");
        (link || cell).textContent = show(row[field]);
      });
    });
  }

  function updateDelays(levels) {
    var line = document.getElementById("delay-levels");
    if (!line || !levels) return;
    ["delayed", "unrouted"].forEach(function (field) {
      var cell = line.querySelector('[data-field="' + field + '"]');
      if (cell) cell.textContent = show(levels[field]);
    });
  }

  function poll() {
    fetch("/api/overview", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error(response.status);
        return response.json();
      })
      .then(function (data) {
        update(data.listeners);
        updateDelays(data.delay_levels);
        freshness.textContent = "Counts from " + data.age + " s ago; refreshing every " + every / 1000 + " s.";
      })
      .catch(function () { freshness.textContent = "Could not refresh the counts; retrying."; })
      .finally(function () { setTimeout(poll, every); });
  }
  setTimeout(poll, every);
})();

// Other live parts (workers, an unfinished job, the overview's charts) carry
// data-live="SECONDS": they reload their own fragment from the page's URL in place.
(function () {
  "use strict";
  document.querySelectorAll("[data-live][id]").forEach(function (part) {
    var every = (parseInt(part.getAttribute("data-live"), 10) || 3) * 1000;
    function poll() {
      fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (!response.ok) throw new Error(response.status);
          return response.text();
        })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(part.id);
          if (!fresh) return;
          part.replaceChildren.apply(part, Array.from(fresh.childNodes));
          if (!fresh.hasAttribute("data-live")) part = null;  // finished: stop polling
        })
        .catch(function () { /* keep what is shown; try again */ })
        .finally(function () { if (part) setTimeout(poll, every); });
    }
    setTimeout(poll, every);
  });
})();
