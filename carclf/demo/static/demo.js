// carclf demo page: plain JavaScript, no libraries (the page must work without internet access).
"use strict";

let info = null;
const $ = (selector, root = document) => root.querySelector(selector);

function megabytes(bytes) { return (bytes / (1024 * 1024)).toFixed(1) + " MB"; }
function fileSize(bytes) { return bytes < 1024 * 1024 ? Math.ceil(bytes / 1024) + " KB" : megabytes(bytes); }
function percent(p) { return (100 * p).toFixed(1) + "%"; }

function showNotice(text) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.hidden = !text;
}

async function loadInfo() {
  const model = $("#model");
  try {
    const response = await fetch("api/info");
    info = await response.json();
  } catch (error) {
    model.textContent = "Cannot reach the demo server: " + error.message;
    return;
  }
  model.textContent = "";
  const add = (label, value, title) => {
    const span = document.createElement("span");
    span.className = "fact";
    span.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    if (title) b.title = title;
    span.append(b, "  \u00b7  ");
    model.append(span);
  };
  add("Model", info.name, info.uri);
  add("version", info.version);
  add("precision", info.precision, info.precision_reason);
  add("input", info.image_size + " px, crop " + info.crop);
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = info.num_classes + " classes";
  const list = document.createElement("ul");
  for (const name of info.classes) {
    const li = document.createElement("li");
    li.textContent = name;
    list.append(li);
  }
  details.append(summary, list);
  model.append(details);
  model.dataset.ready = "true";
  let limits = "Up to " + info.max_files + " photos at a time, " + megabytes(info.max_upload_bytes) + " each.";
  if (info.crop !== "bbox") limits += " This model was trained on whole photos (crop " + info.crop + "): a box is checked but does not change the crop.";
  $("#limits").textContent = limits;
}

function handleFiles(fileList) {
  const files = Array.from(fileList || []);
  showNotice("");
  if (!files.length) return;
  if (!info) { showNotice("The model description has not loaded yet: try again in a moment."); return; }
  if (files.length > info.max_files) {
    showNotice("Too many files: " + files.length + " selected, the limit is " + info.max_files +
               " at a time. Nothing was uploaded; choose fewer.");
    return;
  }
  for (const file of files) addCard(file);
}

function addCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.dataset.name = file.name;
  $(".file-name", card).textContent = file.name + " (" + fileSize(file.size) + ")";
  $("#results").prepend(card);
  if (file.size > info.max_upload_bytes) {
    showError(card, file.name + " is " + megabytes(file.size) + ", above the limit of " +
              megabytes(info.max_upload_bytes) + " per photo: it was not uploaded.");
    $(".photo", card).hidden = true;
    return;
  }
  const img = $("img.source", card);
  img.onerror = () => { $(".photo", card).hidden = true; };
  img.onload = () => enableBoxDrawing(card, file);
  img.src = URL.createObjectURL(file);
  classify(card, file, null);
}

function showError(card, text) {
  card.classList.add("failed");
  card.dataset.state = "error";
  $(".status", card).hidden = true;
  $(".answer", card).hidden = true;
  $(".heat", card).hidden = true;
  const error = $(".error", card);
  error.textContent = text;
  error.hidden = false;
}

// A few photos at a time: the server's cores are shared, and each photo's time should be its own.
const MAX_IN_FLIGHT = 3;
let inFlight = 0;
const waiting = [];
function takeSlot() {
  if (inFlight < MAX_IN_FLIGHT) { inFlight += 1; return Promise.resolve(); }
  return new Promise((resolve) => waiting.push(resolve));
}
function releaseSlot() {
  const next = waiting.shift();
  if (next) next(); else inFlight -= 1;
}

async function classify(card, file, bbox) {
  card.dataset.state = "busy";
  card.classList.remove("failed");
  $(".error", card).hidden = true;
  const status = $(".status", card);
  status.hidden = false;
  status.textContent = bbox ? "Classifying the box\u2026" : "Classifying\u2026";
  const params = new URLSearchParams({ name: file.name });
  if (bbox) ["x1", "y1", "x2", "y2"].forEach((key, i) => params.set(key, String(bbox[i])));
  await takeSlot();
  const started = performance.now();
  let response, text;
  try {
    response = await fetch("api/predict?" + params.toString(), {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    text = await response.text();
  } catch (error) {
    showError(card, file.name + ": no answer from the demo server (" + error.message + ")");
    return;
  } finally {
    releaseSlot();
  }
  const roundTrip = performance.now() - started;
  let body;
  try {
    body = JSON.parse(text);
  } catch (error) {
    body = { error: file.name + ": HTTP " + response.status + " " + text.slice(0, 200) };
  }
  if (!response.ok) {
    showError(card, body.error || (file.name + ": HTTP " + response.status));
    return;
  }
  showAnswer(card, body, roundTrip);
}

function showAnswer(card, answer, roundTrip) {
  $(".status", card).hidden = true;
  $(".top1-label", card).textContent = answer.label;
  $(".top1-prob", card).textContent = percent(answer.prob);
  const list = $(".top5", card);
  list.textContent = "";
  for (const entry of answer.top_k) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.label;
    name.title = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = Math.max(0.5, 100 * entry.prob).toFixed(1) + "%";
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(entry.prob);
    li.append(name, bar, pct);
    list.append(li);
  }
  $(".timing", card).textContent = "classified in " + answer.classify_ms.toFixed(0) + " ms \u00b7 heatmap " +
    answer.heatmap_ms.toFixed(0) + " ms \u00b7 round trip " + roundTrip.toFixed(0) + " ms";
  $(".answer", card).hidden = false;
  const heat = $(".heat", card);
  $("img.heatmap", heat).src = answer.heatmap;
  const r = answer.region;
  $("figcaption", heat).textContent = "Where it looked (Grad-CAM for \u201c" + answer.label + "\u201d): red raised this " +
    "score most, blue did not matter. Region " + r[0] + "," + r[1] + " \u2013 " + r[2] + "," + r[3] + " px, " +
    answer.heatmap_cells.join("\u00d7") + " cells of " + answer.heatmap_layer + ".";
  heat.hidden = false;
  card.dataset.state = "done";
  card.dataset.label = answer.label;
  card.dataset.bbox = answer.bbox ? answer.bbox.join(",") : "";
}

// A box drawn on the displayed photo, converted to the photo's own pixels (what the REST bbox columns mean).
function enableBoxDrawing(card, file) {
  const photo = $(".photo", card);
  const img = $("img.source", card);
  const box = $(".box", card);
  const text = $(".box-text", card);
  const clear = $(".clear-box", card);
  let start = null;

  const local = (event) => {
    const rect = img.getBoundingClientRect();
    return [Math.min(Math.max(event.clientX - rect.left, 0), rect.width),
            Math.min(Math.max(event.clientY - rect.top, 0), rect.height)];
  };
  const draw = (a, b) => {
    box.style.left = Math.min(a[0], b[0]) + "px";
    box.style.top = Math.min(a[1], b[1]) + "px";
    box.style.width = Math.abs(a[0] - b[0]) + "px";
    box.style.height = Math.abs(a[1] - b[1]) + "px";
    box.hidden = false;
  };
  photo.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    start = local(event);
    photo.setPointerCapture(event.pointerId);
  });
  photo.addEventListener("pointermove", (event) => { if (start) draw(start, local(event)); });
  photo.addEventListener("pointerup", (event) => {
    if (!start) return;
    const end = local(event);
    const a = start;
    start = null;
    const sx = img.naturalWidth / img.clientWidth, sy = img.naturalHeight / img.clientHeight;
    const x1 = Math.floor(Math.min(a[0], end[0]) * sx), x2 = Math.ceil(Math.max(a[0], end[0]) * sx);
    const y1 = Math.floor(Math.min(a[1], end[1]) * sy), y2 = Math.ceil(Math.max(a[1], end[1]) * sy);
    if (x2 - x1 < 4 || y2 - y1 < 4) { box.hidden = true; return; }  // a click, not a box
    const bbox = [x1, y1, Math.min(x2, img.naturalWidth), Math.min(y2, img.naturalHeight)];
    text.textContent = "Box " + bbox[0] + "," + bbox[1] + " \u2013 " + bbox[2] + "," + bbox[3] + " px (of " +
      img.naturalWidth + "\u00d7" + img.naturalHeight + ")";
    clear.hidden = false;
    classify(card, file, bbox);
  });
  clear.addEventListener("click", () => {
    box.hidden = true;
    text.textContent = "";
    clear.hidden = true;
    classify(card, file, null);
  });
}

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handleFiles(event.dataTransfer.files);
});
// Dropping a photo next to the zone must not make the browser navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());
$("#picker").addEventListener("change", (event) => { handleFiles(event.target.files); event.target.value = ""; });
loadInfo();
