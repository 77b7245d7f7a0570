// The service's page: pick a kind, write a prompt (or a treatment, or a story; Korean works), optionally upload a
// photo, follow the job's progress (server-sent events read with fetch, so the API key header goes along; polling
// when the stream breaks), then show its images and manifest. Text from the server is shown with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const TEXTS = {
  txt2img: ["Prompt", "What to draw."],
  img2img: ["Prompt", "How to redraw the photo."],
  panel: ["Treatment", "One sentence, English or Korean: a panel is drawn from the dataset image it retrieves."],
  story: ["Story", "One sentence per line (2 to 4): one panel each, in a vertical strip."],
};
let models = null;
let current = null; // the job being followed

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = body && body.detail;
    const message = Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : detail || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function start() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    if (health.status === "loading") {
      say("The models are loading…");
      setTimeout(start, 2000);
      return;
    }
    models = await api("/v1/models");
  } catch (error) {
    say(`Cannot reach the service: ${error.message}`, true);
    return;
  }
  const kinds = Object.keys(models.kinds);
  if (!kinds.length) {
    say(`No model is loaded. ${Object.values(models.unavailable).join(" ")}`, true);
    return;
  }
  $("kind").replaceChildren(...kinds.map((kind) => new Option(kind, kind)));
  say(`Ready: ${kinds.join(", ")}.`);
  $("job-form").hidden = false;
  chooseKind();
}

function chooseKind() {
  const kind = $("kind").value;
  const [caption, hint] = TEXTS[kind];
  $("text-caption").textContent = caption;
  $("text-hint").textContent = hint;
  $("photo-label").hidden = kind !== "img2img";
  $("style").replaceChildren(...models.kinds[kind].styles.map((style) => new Option(style, style)));
}

async function request() {
  const kind = $("kind").value;
  const text = $("text").value.trim();
  const body = { kind, seed: Number($("seed").value || 0), style: $("style").value };
  if ($("steps").value) body.steps = Number($("steps").value);
  if (kind === "txt2img") body.prompt = text;
  if (kind === "panel") body.treatment = text;
  if (kind === "story") body.story = text.split("\n").map((s) => s.trim()).filter(Boolean);
  if (kind === "img2img") {
    const file = $("photo").files[0];
    if (!file) throw new Error("choose a photo to redraw");
    const form = new FormData();
    form.append("file", file);
    body.photo = (await api("/v1/uploads", { method: "POST", body: form })).id;
    body.prompt = text;
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  $("submit").disabled = true;
  try {
    const body = await request();
    const job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    current = job.id;
    $("cancel").disabled = false;
    $("job").hidden = false;
    $("images").replaceChildren();
    $("manifest").textContent = "";
    $("progress").value = 0;
    show(job);
    await follow(job);
  } catch (error) {
    say(error.message, true);
  } finally {
    $("submit").disabled = false;
  }
}

async function follow(job) {
  try {
    await stream(job);
  } catch (error) {
    await poll(job.id); // the stream broke (a proxy, a reload of the server): ask every second instead
  }
}

async function stream(job) {
  const response = await fetch(job.events_url, { headers: headers({ Accept: "text/event-stream" }) });
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const fields = {};
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        if (colon > 0) fields[line.slice(0, colon)] = line.slice(colon + 1).trim();
      }
      if (fields.data) handle(job.id, fields.event, JSON.parse(fields.data));
    }
  }
}

async function poll(jobId) {
  for (;;) {
    const job = await api(`/v1/jobs/${jobId}`);
    show(job);
    if (!["queued", "running"].includes(job.state)) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function handle(jobId, event, data) {
  if (jobId !== current) return;
  if (event === "progress") {
    $("progress").max = data.total;
    $("progress").value = data.done;
    $("job-state").textContent = `running: step ${data.done} of ${data.total}`;
  } else if (data.job) {
    show(data.job);
  } else {
    $("job-state").textContent = data.state + (data.cancel_requested ? " (cancelling)" : "");
  }
}

function show(job) {
  const position = job.queue_position ? ` (position ${job.queue_position} in the queue)` : "";
  $("job-state").textContent = `${job.state}${position}${job.error ? ": " + job.error : ""}`;
  $("job-state").className = job.state === "failed" ? "error" : "";
  if (job.progress.total) {
    $("progress").max = job.progress.total;
    $("progress").value = job.progress.done;
  }
  if (!["queued", "running"].includes(job.state)) {
    $("cancel").disabled = true;
    if (job.manifest) $("manifest").textContent = JSON.stringify(job.manifest, null, 2);
    if (job.images.length) showImages(job.images);
  }
}

async function showImages(images) {
  const shown = images.filter((image) => image.role !== "retrieved" && image.role !== "control");
  const figures = await Promise.all(
    shown.map(async (image) => {
      const response = await fetch(image.url, { headers: headers() });
      const figure = document.createElement("figure");
      figure.className = image.role;
      const img = document.createElement("img");
      img.alt = image.role;
      img.src = URL.createObjectURL(await response.blob());
      const caption = document.createElement("figcaption");
      caption.textContent = image.role;
      figure.append(img, caption);
      return figure;
    }),
  );
  $("images").replaceChildren(...figures);
}

async function cancel() {
  if (!current) return;
  try {
    show(await api(`/v1/jobs/${current}`, { method: "DELETE" }));
  } catch (error) {
    say(error.message, true);
  }
}

$("job-form").addEventListener("submit", submit);
$("kind").addEventListener("change", chooseKind);
$("cancel").addEventListener("click", cancel);
start();
