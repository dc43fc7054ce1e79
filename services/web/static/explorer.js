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
      await refresh(status);
      status.textContent = `live · ${status.dataset.lastType} v${status.dataset.lastVersion}`;
    }, 300);
  });
}

async function refresh(status) {
  if (status.dataset.refresh) {
    const response = await fetch(status.dataset.refresh, { credentials: "same-origin" });
    if (response.ok) document.getElementById(status.dataset.target).innerHTML = await response.text();
    return;
  }
  if (document.querySelector("input[name=without]:checked")) return;  // keep what the user ticked
  const response = await fetch(window.location.href, { credentials: "same-origin" });
  if (!response.ok) return;
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.querySelector("main");
  const statusNow = fresh && fresh.querySelector("#live-status");
  if (!fresh || !statusNow) return;
  statusNow.replaceWith(status);  // keep the open connection's element
  document.querySelector("main").replaceWith(fresh);
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
