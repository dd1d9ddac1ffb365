"""The built-in web page at ``/``: pick a model, a prompt (or class) and SSG's beta; the page asks the API twice with
one seed (baseline: no SSG; SSG at beta) and shows both images side by side with the seed. Static HTML + script: it
reads ``GET /v1/models`` and posts to ``/v1/images/generations`` like any client."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssg-engine</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 52em; }
label { display: inline-block; margin: 0.3em 1em 0.3em 0; }
.pair { display: flex; gap: 2em; margin-top: 1em; }
figure { margin: 0; text-align: center; }
img { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #ccc; background: #eee; }
#error { color: #b00; }
</style></head>
<body>
<h1>ssg-engine</h1>
<form id="form">
  <label>Model <select id="model"></select></label>
  <label id="prompt-label">Prompt <input id="prompt" size="40" value="a photo of a sneaker"></label>
  <label id="class-label">Class <select id="class"></select></label><br>
  <label>SSG beta <input id="beta" type="range" min="0" max="2" step="0.05" value="0.5">
    <output id="beta-value">0.5</output></label>
  <label>Seed <input id="seed" size="20" placeholder="random"></label>
  <button id="generate" type="submit">Generate</button>
</form>
<p>Seed: <span id="seed-used">-</span> <span id="status"></span> <span id="error"></span></p>
<div class="pair">
  <figure><img id="baseline" alt="baseline"><figcaption>baseline</figcaption></figure>
  <figure><img id="ssg" alt="SSG"><figcaption>SSG, beta <span id="beta-shown">-</span></figcaption></figure>
</div>
<script>
const $ = (id) => document.getElementById(id);
let models = {};
function showModel() {
  const m = models[$("model").value];
  const text = m.conditioning === "text";
  $("prompt-label").style.display = text ? "" : "none";
  $("class-label").style.display = text ? "none" : "";
  $("class").innerHTML = "";
  const names = m.class_names.length ? m.class_names : [...Array(m.num_classes).keys()].map(String);
  names.forEach((name, i) => { const o = document.createElement("option"); o.value = i; o.textContent = name; $("class").appendChild(o); });
  $("beta").value = m.defaults.ssg_scale; $("beta-value").textContent = m.defaults.ssg_scale;
}
async function ask(body) {
  const r = await fetch("/v1/images/generations", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
  return j;
}
async function generate(event) {
  event.preventDefault();
  $("error").textContent = ""; $("status").textContent = "generating...";
  $("baseline").removeAttribute("src"); $("ssg").removeAttribute("src");
  const m = models[$("model").value];
  const seedText = $("seed").value.trim();
  const seed = seedText === "" ? Math.floor(Math.random() * 2 ** 31) : Number(seedText);
  const body = {model: m.id, n: 1, response_format: "b64_json", seed: seed};
  if (m.conditioning === "text") body.prompt = $("prompt").value; else body.class_labels = [Number($("class").value)];
  const beta = Number($("beta").value);
  try {
    const [base, guided] = await Promise.all([ask(body), ask({...body, ssg_scale: beta})]);
    $("baseline").src = "data:image/png;base64," + base.data[0].b64_json;
    $("ssg").src = "data:image/png;base64," + guided.data[0].b64_json;
    $("seed-used").textContent = base.seed; $("beta-shown").textContent = beta;
    $("status").textContent = "done";
  } catch (e) { $("status").textContent = ""; $("error").textContent = e.message; }
}
$("beta").addEventListener("input", () => { $("beta-value").textContent = $("beta").value; });
$("model").addEventListener("change", showModel);
$("form").addEventListener("submit", generate);
fetch("/v1/models").then((r) => r.json()).then((j) => {
  j.data.forEach((m) => { models[m.id] = m; const o = document.createElement("option"); o.value = m.id; o.textContent = m.id; $("model").appendChild(o); });
  showModel(); $("generate").disabled = false;
});
$("generate").disabled = true;
</script>
</body></html>
"""
