// The explorer's only script: live updates over server-sent events, and the time slider.
// Every page works without it (tables are server-rendered; forms submit as usual).
"use strict";

function liveUpdates() {
  const status = document.getElementById("live-status");
  if (!status || !window.EventSource) return;
  const source = new EventSource(status.dataset.live);
  let pending = null;
  status.textContent = "connecting…";
  source.addEventListener("open", () => { status.textContent = "live"; status.classList.add("on"); });
  source.addEventListener("error", () => { status.textContent = "reconnecting…"; status.classList.remove("on"); });
  source.addEventListener("ledger", (message) => {
    const event = JSON.parse(message.data);
    status.dataset.lastVersion = String(event.version);
    status.dataset.lastType = event.event_type;
    if (pending) return;
    // Many events in a burst: one refresh.
    pending = setTimeout(async () => {
      pending = null;
      const shown = await refresh(status);
      const last = `${status.dataset.lastType} v${status.dataset.lastVersion}`;
      status.textContent = shown ? `live · ${last}` : `live · ${last} arrived: reload to see it`;
    }, REFRESH_MS);
  });
}

const REFRESH_MS = 300;

// Whether the page now shows the latest state; false when the person is busy with it (an event
// opened, events ticked for a what-if), which a refresh would undo.
async function refresh(status) {
  if (status.dataset.refresh) {
    const response = await fetch(status.dataset.refresh, { credentials: "same-origin" });
    if (response.ok) document.getElementById(status.dataset.target).innerHTML = await response.text();
    return response.ok;
  }
  if (document.querySelector("input[name=without]:checked, details[open]")) return false;
  const response = await fetch(window.location.href, { credentials: "same-origin" });
  if (!response.ok) return false;
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.querySelector("main");
  const statusNow = fresh && fresh.querySelector("#live-status");
  if (!fresh || !statusNow) return false;
  statusNow.replaceWith(status);  // keep the open connection's element
  document.querySelector("main").replaceWith(fresh);
  return true;
}

function timeSlider() {
  const slider = document.getElementById("version-slider");
  const shown = document.getElementById("version-shown");
  if (!slider) return;
  slider.addEventListener("input", () => { if (shown) shown.textContent = slider.value; });
  slider.addEventListener("change", () => slider.form.submit());
}

document.addEventListener("DOMContentLoaded", () => {
  liveUpdates();
  timeSlider();
});
