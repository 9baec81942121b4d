"use strict";
(function () {
  var form = document.getElementById("form");
  var button = document.getElementById("update");
  var retryForm = document.getElementById("retry-form");
  var retryButton = document.getElementById("retry");
  var backoff = document.getElementById("backoff");
  var backoffText = document.getElementById("backoff-text");
  var statusLine = document.getElementById("status");
  var progress = document.getElementById("progress");
  var log = document.getElementById("log");
  var result = document.getElementById("result");
  var source = null;

  function busy(on) {
    button.disabled = on;
    retryButton.disabled = on;
    button.textContent = on ? "UPDATING\u2026" : "UPDATE MY MACHINE";
  }

  function showRows(rows) {
    var body = document.getElementById("state");
    while (body.firstChild) { body.removeChild(body.firstChild); }
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      var th = document.createElement("th");
      var td = document.createElement("td");
      th.textContent = r.label;
      td.textContent = r.value;
      td.dataset.key = r.key;
      td.className = r.class;
      tr.appendChild(th);
      tr.appendChild(td);
      body.appendChild(tr);
    });
  }

  function showRetry(offer) {
    backoff.hidden = !offer;
    backoffText.textContent = offer ? offer.message : "";
  }

  function refreshState() {
    return fetch("/state", { headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (s) { showRows(s.rows); showRetry(s.retry); })
      .catch(function () { /* the table keeps what it showed */ });
  }

  function follow() {
    if (source) { return; }
    busy(true);
    progress.hidden = false;
    source = new EventSource("/events");
    source.addEventListener("run", function (e) {
      var run = JSON.parse(e.data);
      while (log.firstChild) { log.removeChild(log.firstChild); }
      result.textContent = "";
      result.className = "";
      statusLine.textContent = (run.trigger === "retry" ? "Retry running since " : "Update running since ") +
        run.started.replace("T", " ").replace("Z", " UTC") + "\u2026";
    });
    source.onmessage = function (e) {
      var li = document.createElement("li");
      li.textContent = e.data;
      log.appendChild(li);
      log.scrollTop = log.scrollHeight;
    };
    source.addEventListener("result", function (e) {
      var r = JSON.parse(e.data);
      source.close();
      source = null;
      result.textContent = r.message;
      result.className = (r.outcome === "updated" || r.outcome === "nothing-to-do") ? "ok" : "bad";
      result.dataset.outcome = r.outcome;
      statusLine.textContent = "Finished.";
      busy(false);
      refreshState();
    });
    source.addEventListener("idle", function () {
      source.close();
      source = null;
      statusLine.textContent = "";
      busy(false);
    });
    source.onerror = function () {
      if (!source) { return; }
      statusLine.textContent = "Lost the connection to the agent; reconnecting\u2026";
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: every event stream slot taken); the browser gives up, so try again.
        source.close();
        source = null;
        setTimeout(follow, 3000);
      }
    };
  }

  // The same POST a plain form sends (a same-origin request, checked by the agent), so the
  // page works without JavaScript too.
  function start(body) {
    busy(true);
    result.textContent = "";
    result.className = "";
    statusLine.textContent = "Starting\u2026";
    fetch("/update", {
      method: "POST",
      headers: { "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded" },
      body: body
    })
      .then(function (r) {
        if (!r.ok) { return r.text().then(function (t) { throw new Error(t); }); }
        return r.json();
      })
      .then(function (j) {
        statusLine.textContent = j.started ? "Update started." : "An update was already running; showing it.";
        follow();
      })
      .catch(function (err) {
        statusLine.textContent = "Could not start the update: " + err.message;
        busy(false);
      });
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    start("");
  });
  retryForm.addEventListener("submit", function (e) {
    e.preventDefault();
    start("retry=1");
  });

  if (document.body.dataset.running === "true") { follow(); }
})();
