// reslab serve web page: pick or drop an image, POST it to /predict and /saliency, draw the answers.
// Plain JS, no dependencies and nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
let requestSerial = 0; // a newer upload wins over answers still in flight for an older one
let saliencyOf = "the served model"; // from /model; null: the server has no float weights to explain

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function row(term, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  $("card").append(dt, dd);
}

function pct(x) { return (100 * x).toFixed(1) + "%"; }

async function loadCard() {
  try {
    const r = await fetch("/model");
    const card = await r.json();
    if (!r.ok) throw new Error(card.detail || r.statusText);
    $("subtitle").textContent = `${card.name} · ${card.num_classes} classes · trained on ${card.data}`;
    row("model", card.name);
    if (card.paper) row("paper", card.paper);
    row("data", card.data);
    const shown = card.classes.slice(0, 20).join(", ");
    row("classes", card.classes.length > 20 ? `${shown}, … (${card.classes.length})` : shown);
    for (const [name, value] of Object.entries(card.metrics || {})) {
      row(name, typeof value === "number" && name.includes("top") ? pct(value) :
          typeof value === "number" ? value.toFixed(4) : String(value));
    }
    if (card.params) row("parameters", card.params.toLocaleString());
    const p = card.preprocessing;
    row("input", `${p.channels} channel(s), stored ${p.stored_size.join("×")}, model ${p.input_size.join("×")}`);
    row("checkpoint", `${card.checkpoint.name} (step ${card.checkpoint.step ?? "?"})`);
    if (card.format !== "checkpoint") {
      const q = card.quantization;
      row("format", q ? `${card.format} (${q.runtime ?? "int8"})` : card.format);
    }
    saliencyOf = card.saliency_of;
    row("device", `${card.device}, amp ${card.amp}`);
  } catch (e) {
    $("subtitle").textContent = "the model card could not be loaded: " + e.message;
  }
}

function drawBars(top) {
  const list = $("bars");
  list.replaceChildren();
  for (const t of top) {
    const li = document.createElement("li");
    li.className = "bar-row";
    li.dataset.class = t.class;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = t.class;
    label.title = t.class;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = pct(t.probability);
    li.append(label, bar, value);
    list.append(li);
    requestAnimationFrame(() => { fill.style.width = (100 * t.probability).toFixed(2) + "%"; });
  }
}

async function postImage(path, file) {
  const body = new FormData();
  body.append("file", file, file.name || "image");
  const r = await fetch(path, { method: "POST", body });
  let answer;
  try { answer = await r.json(); } catch { answer = { detail: r.statusText }; }
  if (!r.ok) throw new Error(`${r.status}: ${answer.detail || r.statusText}`);
  return answer;
}

async function handleFile(file) {
  if (!file) return;
  const serial = ++requestSerial;
  showError("");
  $("status").textContent = `classifying ${file.name || "image"}…`;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("saliency").hidden = true;
  $("bars").replaceChildren();
  try {
    const [prediction, saliency] = await Promise.all([postImage("/predict?topk=5", file),
                                                      saliencyOf ? postImage("/saliency", file)
                                                        .catch((e) => ({ error: e.message })) : null]);
    if (serial !== requestSerial) return;
    drawBars(prediction.top);
    if (saliency && saliency.error) {
      $("saliency-caption").textContent = "no saliency: " + saliency.error;
    } else if (saliency) {
      const img = $("saliency");
      img.src = "data:image/png;base64," + saliency.overlay_png;
      img.hidden = false;
      const of = saliency.explains === "the served model" ? "" : ` (${saliency.explains})`;
      $("saliency-caption").textContent =
        `Grad-CAM for “${saliency.target.class}” on ${saliency.layer}${of}`;
    } else {
      $("saliency-caption").textContent = "no saliency: this model file was served without its float weights";
    }
    $("status").textContent = `${prediction.top[0].class}: ${pct(prediction.top[0].probability)}`;
  } catch (e) {
    if (serial !== requestSerial) return;
    preview.hidden = true;
    $("status").textContent = "";
    showError(e.message);
  }
}

function setup() {
  const zone = $("dropzone");
  $("file").addEventListener("change", (e) => handleFile(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => handleFile(e.dataTransfer.files[0]));
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  // Dropping a file anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  loadCard();
}

setup();
