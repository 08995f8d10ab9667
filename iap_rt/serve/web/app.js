// The iap-rt web page: a form that posts to /v1/images/generations and shows the images; in
// edit mode it posts an uploaded image, a mask painted on a canvas (or uploaded) and the
// strength to /v1/images/edits, and shows each result beside its input.
"use strict";
const $ = (id) => document.getElementById(id);

async function loadInfo() {
  const info = await (await fetch("/info")).json();
  if (info.model_id) $("model").textContent = `${info.model_id} · ${info.default_size}x${info.default_size}`;
  for (const s of info.schedulers || []) {
    const o = document.createElement("option");
    o.value = o.textContent = s;
    $("scheduler").appendChild(o);
  }
  if (info.default_guidance !== undefined) $("guidance_scale").value = info.default_guidance;
  if (info.auth_required) $("key-row").hidden = false;
  $("api_key").value = localStorage.getItem("iap-rt-key") || "";
}

function body() {
  const b = { prompt: $("prompt").value, response_format: "b64_json" };
  if ($("negative_prompt").value) b.negative_prompt = $("negative_prompt").value;
  if ($("size").value && $("size").value !== "auto") b.size = $("size").value.trim();
  for (const k of ["steps", "n", "seed"]) if ($(k).value !== "") b[k] = parseInt($(k).value, 10);
  if ($("guidance_scale").value !== "") b.guidance_scale = parseFloat($("guidance_scale").value);
  if ($("scheduler").value) b.scheduler = $("scheduler").value;
  return b;
}

function show(item, input) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.className = "result";
  const p = item.parameters || {};
  img.alt = p.prompt || "";
  const cap = document.createElement("figcaption");
  cap.textContent = [
    p.prompt, p.negative_prompt ? `negative: ${p.negative_prompt}` : "",
    `seed ${p.seed} · ${p.steps} steps · guidance ${p.guidance} · ${p.scheduler}`,
    p.strength !== undefined ? `strength ${p.strength}${p.inpaint ? " · inpainted" : ""}` : "",
    `${p.width}x${p.height} · ${p.model_id} · ${p.backend}`,
  ].filter(Boolean).join("\n");
  if (input) {  // an edit: the input beside the result
    const pair = document.createElement("div");
    pair.className = "pair";
    const before = document.createElement("img");
    before.src = input;
    before.className = "input";
    before.alt = "input";
    pair.append(before, img);
    fig.append(pair, cap);
  } else {
    fig.append(img, cap);
  }
  $("results").prepend(fig);
}

// ---- edit mode: the image on a canvas, the mask painted over it ---------------------------
const edit = { image: null, url: null, painted: null, maskFile: null };

function editing() { return $("mode_edit").checked; }

for (const id of ["mode_generate", "mode_edit"]) {
  $(id).addEventListener("change", () => { $("edit").hidden = !editing(); });
}

function redraw() {
  const c = $("mask_canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (edit.image) ctx.drawImage(edit.image, 0, 0);
  if (edit.painted) {
    ctx.globalAlpha = 0.55;
    ctx.drawImage(edit.painted, 0, 0);
    ctx.globalAlpha = 1;
  }
}

$("edit_image").addEventListener("change", () => {
  const file = $("edit_image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      edit.image = img;
      edit.url = reader.result;
      const c = $("mask_canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      edit.painted = document.createElement("canvas");
      edit.painted.width = c.width;
      edit.painted.height = c.height;
      redraw();
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
});

$("edit_mask").addEventListener("change", () => { edit.maskFile = $("edit_mask").files[0] || null; });

let drawing = false;
function paint(ev) {
  if (!drawing || !edit.painted) return;
  const c = $("mask_canvas"), r = c.getBoundingClientRect();
  const x = (ev.clientX - r.left) * c.width / r.width;
  const y = (ev.clientY - r.top) * c.height / r.height;
  const ctx = edit.painted.getContext("2d");
  ctx.fillStyle = "#ff00ff";
  ctx.beginPath();
  ctx.arc(x, y, parseFloat($("brush").value), 0, 2 * Math.PI);
  ctx.fill();
  redraw();
}
$("mask_canvas").addEventListener("pointerdown", (ev) => { drawing = true; paint(ev); });
$("mask_canvas").addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { drawing = false; });
$("clear_mask").addEventListener("click", () => {
  if (edit.painted) edit.painted.getContext("2d").clearRect(0, 0, edit.painted.width, edit.painted.height);
  redraw();
});

// OpenAI's mask convention: fully transparent where the image is to be edited
async function paintedMask() {
  const w = edit.painted.width, h = edit.painted.height;
  const src = edit.painted.getContext("2d").getImageData(0, 0, w, h).data;
  let any = false;
  const out = new ImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const edited = src[4 * i + 3] > 0;
    any = any || edited;
    out.data[4 * i + 3] = edited ? 0 : 255;
  }
  if (!any) return null;
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  c.getContext("2d").putImageData(out, 0, 0);
  return await new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

// an uploaded mask (white = repaint) turned into OpenAI's convention
async function uploadedMask(file) {
  const bmp = await createImageBitmap(file);
  const c = document.createElement("canvas");
  c.width = bmp.width;
  c.height = bmp.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(bmp, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const white = (d.data[i] + d.data[i + 1] + d.data[i + 2]) / 3 >= 128 && d.data[i + 3] > 0;
    d.data[i + 3] = white ? 0 : 255;
  }
  ctx.putImageData(d, 0, 0);
  return await new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

async function editForm() {
  if (!$("edit_image").files[0]) throw new Error("choose an image to edit");
  const f = new FormData();
  f.append("image", $("edit_image").files[0]);
  const mask = edit.maskFile ? await uploadedMask(edit.maskFile) : await paintedMask();
  if (mask) f.append("mask", mask, "mask.png");
  const b = body();
  delete b.size;  // an edit keeps the image's size
  for (const [k, v] of Object.entries(b)) f.append(k, String(v));
  if ($("strength").value !== "") f.append("strength", $("strength").value);
  return f;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("status").textContent = "generating…";
  const headers = {};
  const key = $("api_key").value.trim();
  if (key) { headers.Authorization = "Bearer " + key; localStorage.setItem("iap-rt-key", key); }
  const t0 = performance.now();
  try {
    let r;
    if (editing()) {
      r = await fetch("/v1/images/edits", { method: "POST", headers, body: await editForm() });
    } else {
      headers["Content-Type"] = "application/json";
      r = await fetch("/v1/images/generations", { method: "POST", headers, body: JSON.stringify(body()) });
    }
    const doc = await r.json();
    if (!r.ok) throw new Error((doc.error && doc.error.message) || r.statusText);
    const input = editing() ? edit.url : null;
    [...doc.data].reverse().forEach((item) => show(item, input));
    $("status").textContent = `${doc.data.length} image(s) in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
});

loadInfo();
