// shardworker console: live figures and command progress by polling JSON (no inline script:
// the Content-Security-Policy allows only this file).
"use strict";

function dig(data, path) {
  return path.split(".").reduce((v, k) => (v == null ? v : v[k]), data);
}

function show(value) {
  if (value === true) return "on";
  if (value === false) return "off";
  return value == null ? "—" : String(value);
}

async function fetchJson(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign(document.querySelector("link[rel=stylesheet]").href.replace(/static\/console\.css$/, "login"));
    return null;
  }
  return response.ok ? response.json() : null;
}

function pollLive(box) {
  const tick = async () => {
    try {
      const data = await fetchJson(box.dataset.src);
      if (data) {
        for (const el of box.querySelectorAll("[data-live]")) {
          el.textContent = show(dig(data, el.dataset.live));
        }
        box.dataset.updated = String(Date.now());
      }
    } catch (err) { /* the next tick tries again */ }
  };
  setInterval(tick, 2000);
}

const TERMINAL = new Set(["done", "failed", "rejected", "expired"]);

function pollCommand(box) {
  const state = document.getElementById("command-state");
  const progress = document.getElementById("command-progress");
  const tick = async () => {
    try {
      const data = await fetchJson(box.dataset.src);
      if (!data) return;
      state.textContent = data.state + (data.detail ? " (" + data.detail + ")" : "");
      const parts = ["total", "scanned", "published", "duplicates", "dead_lettered"]
        .filter((k) => data[k] !== undefined).map((k) => k.replace("_", " ") + " " + data[k]);
      progress.textContent = parts.join(" · ");
      box.dataset.state = data.state;
      if (TERMINAL.has(data.state)) return;
    } catch (err) { /* try again */ }
    setTimeout(tick, 700);
  };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) pollLive(live);
  const command = document.getElementById("command");
  if (command) pollCommand(command);
});
