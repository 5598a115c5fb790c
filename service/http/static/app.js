// gendr-serve web page: upload → POST /v1/jobs → poll GET /v1/jobs/{id} → fetch the result.
// API paths are relative ("v1/jobs"): they resolve against the page's <base href>, which the server sets
// to its root path, so the page works behind a proxy that serves it under a prefix (GENDR_ROOT_PATH).
// result_url comes from the server with the prefix already in it.
// Any replica answers any request; a busy (503, Retry-After) or unreachable server is retried with the
// same Idempotency-Key, so a retried upload never makes a second job.
// Plain browser JavaScript, no build step, no dependencies (docs/jobs.md describes the API).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const RETRY_FOR_MS = 10 * 60 * 1000; // how long the page keeps retrying a busy or unreachable server
const TRANSIENT = new Set([502, 503, 504]); // busy, draining, job store away, or a proxy whose pod died
const RESTARTED = new Set(["draining", "job_lost", "interrupted"]); // failed by the service, not the image
let file = null;
let current = null; // {id, xhr, stopped}
let urls = [];

function keyHeader() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      return `${body.error.message} (${body.error.code})`;
    }
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// One key per upload: a retry after a lost answer gets the same job back instead of a second one.
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // plain http on a LAN address: no randomUUID there
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// The wait before the next try: at least Retry-After, else exponential; up to 50 % more so that many
// pages refused together do not come back together.
function retryDelay(response, attempt) {
  const after = Number(response && response.headers.get("Retry-After"));
  const base = Math.min(30, 0.5 * 2 ** attempt);
  return Math.max(after > 0 ? after : 0, base) * (1 + Math.random() / 2);
}

// Waits `seconds`, counting down in the status line; false when the user cancelled meanwhile.
async function waitRetry(me, seconds, why) {
  const end = Date.now() + seconds * 1000;
  while (!me.stopped && Date.now() < end) {
    const left = Math.ceil((end - Date.now()) / 1000);
    setProgress(Number($("progress").value), `${why}, retrying in ${left} s`);
    await new Promise((ok) => setTimeout(ok, Math.min(250, end - Date.now())));
  }
  return !me.stopped;
}

// Sends a request until it gets an answer that is not a busy or unreachable server; `send` makes one
// try (the same Idempotency-Key each time for a submission). Gives up after RETRY_FOR_MS.
async function withRetries(me, send) {
  const start = Date.now();
  for (let attempt = 0; ; attempt++) {
    let r = null;
    let why;
    try {
      r = await send();
      if (!TRANSIENT.has(r.status)) return r;
      why = "Server busy";
    } catch (e) {
      if (me.stopped || e.message === "cancelled") throw e;
      why = "Server unreachable";
    }
    const wait = retryDelay(r, attempt);
    if (Date.now() + wait * 1000 - start > RETRY_FOR_MS) {
      throw new Error(r ? await errorMessage(r) : "the server cannot be reached (network error)");
    }
    if (!(await waitRetry(me, wait, why))) throw new Error("cancelled");
  }
}

function setProgress(value, text) {
  $("progress-box").hidden = false;
  $("progress").value = Math.max(0, Math.min(1, value));
  $("status").textContent = text;
}

function pickFile(f) {
  if (!f) return;
  file = f;
  $("drop-text").textContent = `${f.name} (${Math.round(f.size / 1024)} KiB)`;
  $("go").disabled = false;
  showError("");
}

function query() {
  const q = new URLSearchParams();
  const add = (name, id) => { const v = $(id).value.trim(); if (v) q.set(name, v); };
  add("model", "model");
  const mode = $("size-mode").value;
  if (mode === "scale") add("scale", "scale");
  if (mode === "size") {
    add("width", "width"); add("height", "height");
    if ($("width").value.trim() && $("height").value.trim()) add("fit", "fit");
  }
  add("format", "format");
  add("color_fix", "color-fix");
  add("quality", "quality");
  add("metadata", "metadata");
  if ($("strength").value !== "1") q.set("strength", $("strength").value);
  return q.toString();
}

// XMLHttpRequest, not fetch: only it reports upload progress.
function upload(url, blob, idempotencyKey) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    current.xhr = xhr;
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(keyHeader())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Content-Type", blob.type || "application/octet-stream");
    xhr.setRequestHeader("Idempotency-Key", idempotencyKey);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setProgress(0.1 * e.loaded / e.total, `Uploading ${Math.round(100 * e.loaded / e.total)} %`);
    };
    xhr.onload = () => {
      const headers = { "Content-Type": "application/json" };
      const after = xhr.getResponseHeader("Retry-After");
      if (after) headers["Retry-After"] = after;
      resolve(new Response(xhr.response, { status: xhr.status, headers }));
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.onabort = () => reject(new Error("cancelled"));
    xhr.send(blob);
  });
}

function describe(job) {
  const t = job.tiles;
  const eta = job.eta_s != null ? `, about ${Math.ceil(job.eta_s)} s left` : "";
  if (job.state === "queued") {
    return [0.1, `Queued (${job.queue_position} job(s) ahead${eta})`];
  }
  if (job.state === "running") {
    return [0.1 + 0.85 * t.done / Math.max(1, t.total), `Tiles ${t.done} of ${t.total}${eta}`];
  }
  return [1, job.state];
}

async function run(ev) {
  ev.preventDefault();
  if (!file) return;
  showError("");
  $("result").hidden = true;
  $("go").disabled = true;
  $("cancel").hidden = false;
  current = { id: null, xhr: null, stopped: false };
  const me = current;
  try {
    const q = query();
    const key = newKey();
    const r = await withRetries(me, () => upload(`v1/jobs${q ? "?" + q : ""}`, file, key));
    if (r.status !== 202 && r.status !== 200) throw new Error(await errorMessage(r));
    let job = await r.json();
    me.id = job.id;
    while (job.state === "queued" || job.state === "running") {
      setProgress(...describe(job));
      await new Promise((ok) => setTimeout(ok, POLL_MS));
      if (me.stopped) return;
      // Any replica answers; a busy or unreachable one is asked again, it is not the job failing.
      const s = await withRetries(me, () => fetch(`v1/jobs/${job.id}`, { headers: keyHeader() }));
      if (s.status === 404) {
        me.id = null;
        throw new Error("The server no longer has this job (it expired or was lost). "
          + "Please upload the image again.");
      }
      if (!s.ok) throw new Error(await errorMessage(s));
      job = await s.json();
    }
    if (job.state !== "succeeded") {
      const e = job.error || {};
      if (RESTARTED.has(e.code)) {
        throw new Error(`The server restarted before the job could finish (${e.code}). `
          + "Please upload the image again.");
      }
      throw new Error(`${e.message || "the job " + job.state} (${e.code || job.state})`);
    }
    setProgress(0.97, "Downloading the result");
    const res = await withRetries(me, () => fetch(job.result_url, { headers: keyHeader() }));
    if (res.status === 404 || res.status === 410) {
      throw new Error("The result is no longer stored on the server. Please upload the image again.");
    }
    if (!res.ok) throw new Error(await errorMessage(res));
    show(await res.blob(), job);
    setProgress(1, `Done: ${job.tiles.total} tiles`);
  } catch (e) {
    if (!me.stopped) { showError(e.message); $("progress-box").hidden = true; }
  } finally {
    if (current === me) { $("go").disabled = false; $("cancel").hidden = true; }
  }
}

function show(blob, job) {
  urls.forEach(URL.revokeObjectURL);
  urls = [URL.createObjectURL(file), URL.createObjectURL(blob)];
  $("before").src = urls[0];
  $("after").src = urls[1];
  $("download").href = urls[1];
  $("download").download = file.name.replace(/\.[^.]*$/, "") + "-upscaled." + job.output.format.replace("jpeg", "jpg");
  $("result-size").textContent = `${job.output.width} × ${job.output.height}`;
  $("result").dataset.width = job.output.width;
  $("result").dataset.height = job.output.height;
  $("result").hidden = false;
  applyZoom();
}

function applyZoom() {
  const z = $("zoom").value;
  const w = Number($("result").dataset.width || 0);
  $("compare").style.width = z === "fit" ? "100%" : `${w * Number(z)}px`;
}

async function cancel() {
  const me = current;
  if (!me) return;
  me.stopped = true;
  if (me.xhr) me.xhr.abort();
  if (me.id) await fetch(`v1/jobs/${me.id}`, { method: "DELETE", headers: keyHeader() });
  $("progress-box").hidden = true;
  $("go").disabled = false;
  $("cancel").hidden = true;
}

async function loadModels() {
  try {
    const r = await fetch("v1/models");
    if (!r.ok) return;
    const body = await r.json();
    applyLimits(body.limits);
    for (const m of body.data) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = `${m.name} (×${m.native_scale}, ${m.backend})${m.name === body.default ? " *" : ""}`;
      $("model").append(o);
    }
  } catch (_) { /* the page still works with the default model */ }
}

// The server's own limits (GET /v1/models → limits): the form never offers what the server refuses.
function applyLimits(limits) {
  if (!limits) return;
  if (limits.max_scale) $("scale").max = String(limits.max_scale);
  for (const f of limits.output_formats || []) {
    if (![...$("format").options].some((o) => o.value === f || o.text === f)) {
      const o = document.createElement("option");
      o.textContent = f;
      $("format").append(o);
    }
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", () => pickFile($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pickFile(e.dataTransfer.files[0]); });
  $("size-mode").addEventListener("change", () => { $("form").dataset.mode = $("size-mode").value; });
  $("slider").addEventListener("input", () => $("compare").style.setProperty("--split", `${$("slider").value}%`));
  $("zoom").addEventListener("change", applyZoom);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("api-key").value = sessionStorage.getItem("gendr-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("gendr-api-key", $("api-key").value));
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
