// ferry's website: the dashboard's live cells. Polls /api/v1/disks (the
// same views the page was rendered from) every 2 s and updates each row of
// #disks in place (rows are tr[data-disk=NAME]; a new disk gets a row).
// No inline script anywhere: the Content-Security-Policy allows this file only.
"use strict";
(function () {
  var EVERY_MS = 2000;

  function fmtMs(ms) {
    ms = Math.max(0, ms);
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.floor(ms / 60000) + " min " + Math.floor((ms % 60000) / 1000) + " s";
    return Math.floor(ms / 3600000) + " h " + Math.floor((ms % 3600000) / 60000) + " min";
  }

  function fmtBytes(b) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    if (b < 1024) return b + " B";
    var v = b, u = 0;
    while (v >= 1024 && u + 1 < units.length) { v /= 1024; u++; }
    return v.toFixed(1) + " " + units[u];
  }

  function opt(v, f) { return v === null || v === undefined ? "\u2014" : f(v); }

  function set(cell, text) {
    if (cell && cell.textContent !== text) cell.textContent = text;
  }

  function cell(row, cls) {
    var c = row.querySelector("td." + cls);
    if (!c) { c = document.createElement("td"); c.className = cls; row.appendChild(c); }
    return c;
  }

  function newRow(tbody, d) {
    var row = document.createElement("tr");
    row.setAttribute("data-disk", d.name);
    var name = cell(row, "name");
    var a = document.createElement("a");
    a.href = "/disks/" + encodeURIComponent(d.name);
    a.textContent = d.name;
    name.appendChild(a);
    ["agent", "state", "rpo", "threshold", "lag", "backlog", "alerts"].forEach(function (c) { cell(row, c); });
    cell(row, "rpo").id = "rpo-" + d.name;
    tbody.appendChild(row);
    var none = document.getElementById("no-disks");
    if (none) none.remove();
    return row;
  }

  function update(table, disks) {
    var tbody = table.tBodies[0];
    disks.forEach(function (d) {
      var row = null;
      for (var i = 0; i < tbody.rows.length; i++) {
        if (tbody.rows[i].getAttribute("data-disk") === d.name) { row = tbody.rows[i]; break; }
      }
      if (!row) row = newRow(tbody, d);
      set(cell(row, "agent"), d.agent || "\u2014");
      set(cell(row, "state"), d.state || "unknown");
      var rpo = cell(row, "rpo");
      set(rpo, opt(d.rpo_ms, fmtMs));
      rpo.setAttribute("data-ms", d.rpo_ms === null || d.rpo_ms === undefined ? "" : String(d.rpo_ms));
      rpo.classList.toggle("over", d.rpo_ms !== null && d.rpo_ms !== undefined && d.rpo_ms > d.rpo_threshold_s * 1000);
      var th = cell(row, "threshold");
      set(th, d.rpo_threshold_s + " s");
      th.setAttribute("data-s", String(d.rpo_threshold_s));
      set(cell(row, "lag"), opt(d.lag_ms, fmtMs));
      set(cell(row, "backlog"), opt(d.backlog_bytes, fmtBytes));
      set(cell(row, "alerts"), (d.alerts || []).join(", "));
    });
  }

  function poll(table) {
    var status = document.getElementById("live-status");
    fetch(table.getAttribute("data-live"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login"; throw new Error("logged out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (disks) {
        update(table, disks);
        table.classList.remove("stale");
        table.setAttribute("data-updated", String(Date.now()));
        if (status) set(status, "");
      })
      .catch(function (e) {
        table.classList.add("stale");
        if (status) set(status, "Not updated: " + e.message);
      })
      .then(function () { setTimeout(function () { poll(table); }, EVERY_MS); });
  }

  function start() {
    var table = document.getElementById("disks");
    if (table && table.getAttribute("data-live")) setTimeout(function () { poll(table); }, EVERY_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
