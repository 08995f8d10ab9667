// The iap-rt web page: a form that posts to /v1/images/generations and shows the images.
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

function show(item) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  const p = item.parameters || {};
  img.alt = p.prompt || "";
  const cap = document.createElement("figcaption");
  cap.textContent = [
    p.prompt, p.negative_prompt ? `negative: ${p.negative_prompt}` : "",
    `seed ${p.seed} · ${p.steps} steps · guidance ${p.guidance} · ${p.scheduler}`,
    `${p.width}x${p.height} · ${p.model_id} · ${p.backend}`,
  ].filter(Boolean).join("\n");
  fig.append(img, cap);
  $("results").prepend(fig);
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("status").textContent = "generating…";
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) { headers.Authorization = "Bearer " + key; localStorage.setItem("iap-rt-key", key); }
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/images/generations", { method: "POST", headers, body: JSON.stringify(body()) });
    const doc = await r.json();
    if (!r.ok) throw new Error((doc.error && doc.error.message) || r.statusText);
    [...doc.data].reverse().forEach(show);
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
