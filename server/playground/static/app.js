// The playground: talks to this server's own API. The options come from the server itself
// (its OpenAPI schema, its stored vectors and probes); every answer streams in with each
// token coloured by its entropy.
"use strict";

// Upper edges (nats) of the entropy buckets a token's colour shows; the last bucket is open.
const ENTROPY_EDGES = [0.5, 1, 2, 3, 4];
const TOP_LOGPROBS = 5;
const KEY_STORAGE = "entropy-steer-api-key";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  model: null,
  schemas: {},
  panels: [],  // the methods with a panel built from the schema: {name, schemaName}
  vectors: [],
  probes: [],
  history: { steered: [], plain: [] },
  runs: {},
  controller: null,
};

function bucketOf(entropy) {
  if (entropy === null || entropy === undefined) return "none";
  let bucket = 0;
  while (bucket < ENTROPY_EDGES.length && entropy >= ENTROPY_EDGES[bucket]) bucket++;
  return String(bucket);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-")) node.dataset[name.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

// --- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = body.error?.message || body.detail || message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(message, response.status);
  }
  return response;
}

// Server-sent events of a streamed answer, one parsed JSON object each, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// --- connecting -------------------------------------------------------------------------

async function connect() {
  let models;
  try {
    models = await (await api("/v1/models")).json();
  } catch (error) {
    if (error.status === 401) return askForKey(state.key ? error.message : "");
    return showError(`Cannot reach the server: ${error.message}`);
  }
  $("key-form").hidden = true;
  state.model = models.data[0];
  $("model-name").textContent = state.model.id;
  $("model-context").textContent = state.model.max_model_len ? `· context ${state.model.max_model_len} tokens` : "";
  const [schema, vectors, probes] = await Promise.all([
    fetch("/openapi.json").then((r) => r.json()),
    api("/v1/steering/vectors").then((r) => r.json()),
    api("/v1/steering/probes").then((r) => r.json()),
  ]);
  state.schemas = schema.components.schemas;
  state.vectors = vectors.data;
  state.probes = probes.data;
  buildControls();
  updateSnippet();
  document.body.dataset.ready = "true";
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  connect();
});

// --- controls built from the server's schema -------------------------------------------

// A `$ref` to a component schema, or the schema itself.
function resolve(schema) {
  return schema?.$ref ? state.schemas[schema.$ref.split("/").pop()] : schema;
}

function plain(property) {
  // Optional fields are `anyOf: [schema, null]` in the OpenAPI document; option sets are
  // `$ref`s to enum schemas.
  const variant = property.anyOf ? property.anyOf.find((v) => v.type !== "null") || {} : property;
  const schema = resolve(variant);
  return { ...schema, default: property.default, description: property.description ?? variant.description ?? schema.description };
}

function fieldControl(id, name, property) {
  const p = plain(property);
  const title = p.description || "";
  let input;
  if (p.enum) {
    input = el("select", { id, title });
    for (const option of p.enum) input.append(el("option", { value: option, text: option, selected: option === p.default }));
  } else if (p.type === "boolean") {
    input = el("input", { id, type: "checkbox", title, checked: p.default === true });
    return el("label", { class: "check" }, input, ` ${name}`);
  } else if (p.type === "integer" || p.type === "number") {
    input = el("input", {
      id, type: "number", title, value: p.default ?? p.examples?.[0] ?? "",
      min: p.minimum ?? p.exclusiveMinimum, max: p.maximum ?? p.exclusiveMaximum,
      step: p.type === "integer" ? 1 : "any",
    });
  } else if (p.type === "string") {
    // Escapes shown as typed: a step delimiter of two newlines reads "\n\n".
    input = el("input", { id, type: "text", title, value: p.default === undefined ? "" : JSON.stringify(p.default).slice(1, -1) });
  } else {
    return null;
  }
  return el("label", {}, `${name} `, input);
}

// One group of inputs per options model, e.g. ParticleOptions -> #particles-n, #particles-max-steps.
function buildFields(group, schemaName) {
  const container = $(`${group}-fields`);
  container.replaceChildren();
  const schema = state.schemas[schemaName];
  for (const [name, property] of Object.entries(schema.properties)) {
    const control = fieldControl(`${group}-${name.replaceAll("_", "-")}`, name, property);
    if (control) container.append(control);
  }
}

function readFields(group, schemaName) {
  const schema = state.schemas[schemaName];
  const values = {};
  for (const [name, property] of Object.entries(schema.properties)) {
    const input = $(`${group}-${name.replaceAll("_", "-")}`);
    if (!input) continue;
    const p = plain(property);
    let value;
    if (p.type === "boolean") value = input.checked;
    else if (p.type === "integer" || p.type === "number") {
      if (input.value === "") continue;
      value = Number(input.value);
    } else if (p.type === "string" && !p.enum) {
      try { value = JSON.parse(`"${input.value}"`); } catch (_) { value = input.value; }
    } else value = input.value;
    const required = (schema.required || []).includes(name);
    if (required || value !== p.default) values[name] = value;
  }
  return values;
}

function fillSelect(select, items, describe) {
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", text: "none" }));
  for (const item of items) select.append(el("option", { value: item.id, text: describe(item) }));
  select.value = items.some((i) => i.id === keep) ? keep : "";
}

const describeVector = (v) => `${v.id} (layer ${v.layer}${v.method ? `, ${v.method}` : ""})`;

function buildControls() {
  fillSelect($("east-vector"), state.vectors, describeVector);
  fillSelect($("diffadapt-probe"), state.probes, (p) => p.id);
  const classes = state.schemas.DiffAdaptOptions.properties.difficulty.anyOf.find((s) => s.enum).enum;
  $("diffadapt-difficulty").replaceChildren(el("option", { value: "", text: "the probe's" }),
    ...classes.map((c) => el("option", { value: c, text: c })));
  const positions = state.schemas.EastOptions.properties.positions;
  $("east-positions").replaceChildren(...positions.enum.map((v) => el("option", { value: v, text: v, selected: v === positions.default })));
  buildMethodPanels();
  $("gates").replaceChildren();
}

// The steering fields with a view of their own; every other method in the server's schema gets
// a panel built from its options model: an "on" switch and one input per field.
const OWN_VIEWS = new Set(["east", "diffadapt", "gates", "return_entropy", "return_hidden_states"]);

function buildMethodPanels() {
  state.panels = [];
  const panels = $("method-panels");
  panels.replaceChildren();
  for (const [name, property] of Object.entries(state.schemas.SteeringOptions.properties)) {
    const variant = (property.anyOf || [property]).find((v) => v.$ref);
    if (OWN_VIEWS.has(name) || !variant) continue;
    const schemaName = variant.$ref.split("/").pop();
    const schema = state.schemas[schemaName];
    if (schema.type !== "object") continue;
    panels.append(el("details", { "data-method": name },
      el("summary", { text: schema.title || name, title: schema.description || "" }),
      el("label", { class: "check" }, el("input", { type: "checkbox", id: `${name}-on` }), " on"),
      el("div", { class: "grid", id: `${name}-fields` })));
    buildFields(name, schemaName);
    state.panels.push({ name, schemaName });
  }
}

// A gate: its signal and condition, and one action (sampling field or EAST vector).
let gateCount = 0;

function addGate() {
  const options = state.schemas.GateOptions.properties;
  const actions = Object.keys(state.schemas.GateAction.properties);
  const max = plain(state.schemas.SteeringOptions.properties.gates).maxItems || 4;
  if ($("gates").children.length >= max) return showError(`at most ${max} gates`);
  const n = gateCount++;
  const id = (name) => `gate${n}-${name}`;
  const vector = el("select", { id: id("vector") });
  fillSelect(vector, state.vectors, describeVector);
  const row = el("fieldset", { class: "gate", "data-gate": n },
    el("legend", { text: "gate" }),
    fieldControl(id("signal"), "signal", options.signal),
    fieldControl(id("above"), "above", options.above),
    fieldControl(id("below"), "below", options.below),
    fieldControl(id("ema"), "ema", options.ema),
    fieldControl(id("hold"), "hold", options.hold),
    el("label", {}, "then ", el("select", { id: id("action") }, ...actions.map((a) => el("option", { value: a, text: a })))),
    el("label", { class: "gate-value" }, "value ", el("input", { id: id("value"), type: "number", step: "any", value: "0.3" })),
    el("label", { class: "gate-vector", hidden: true }, "vector ", vector),
    el("label", { class: "gate-vector", hidden: true }, "scale ", el("input", { id: id("scale"), type: "number", step: "any", value: "4" })),
    el("button", { type: "button", class: "remove", "aria-label": "remove this gate", text: "Remove" }),
  );
  row.querySelector(`#${id("action")}`).addEventListener("change", (event) => {
    const east = event.target.value === "east";
    row.querySelector(".gate-value").hidden = east;
    row.querySelectorAll(".gate-vector").forEach((x) => { x.hidden = !east; });
  });
  row.querySelector(".remove").addEventListener("click", () => { row.remove(); updateSnippet(); });
  row.querySelector(`#${id("above")}`).value = "2";  // a first gate to edit: fires above 2 nats
  $("gates").append(row);
  updateSnippet();
}

function readGates() {
  return [...$("gates").children].map((row) => {
    const n = row.dataset.gate;
    const value = (name) => row.querySelector(`#gate${n}-${name}`).value;
    const gate = { signal: value("signal") };
    for (const name of ["above", "below", "ema"]) if (value(name) !== "") gate[name] = Number(value(name));
    if (value("hold") !== "") gate.hold = Number(value("hold"));
    const action = value("action");
    gate.then = action === "east"
      ? { east: { vector: value("vector"), scale: Number(value("scale")) } }
      : { [action]: Number(value("value")) };
    return gate;
  });
}

// --- the request ------------------------------------------------------------------------

const mode = () => document.querySelector("input[name=mode]:checked").value;
const number = (id) => ($(id).value === "" ? null : Number($(id).value));

function steeringOptions() {
  const steering = {};
  for (const { name, schemaName } of state.panels) {
    if ($(`${name}-on`).checked) steering[name] = readFields(name, schemaName);
  }
  if ($("east-vector").value) {
    const east = { vector: $("east-vector").value, scale: number("east-scale") };
    if ($("east-layer").value !== "") east.layers = [number("east-layer")];
    if ($("east-positions").value !== state.schemas.EastOptions.properties.positions.default) east.positions = $("east-positions").value;
    steering.east = east;
  }
  if ($("diffadapt-probe").value) {
    const diffadapt = { probe: $("diffadapt-probe").value };
    if ($("diffadapt-difficulty").value) diffadapt.difficulty = $("diffadapt-difficulty").value;
    if ($("diffadapt-continuation").value) diffadapt.continuation = $("diffadapt-continuation").value === "true";
    steering.diffadapt = diffadapt;
  }
  const gates = readGates();
  if (gates.length) steering.gates = gates;
  return steering;
}

function buildRequest(pane) {
  const body = { model: state.model?.id };
  const prompt = $("prompt").value;
  if (mode() === "chat") {
    const system = $("system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history[pane], { role: "user", content: prompt }];
  } else {
    body.prompt = prompt;
  }
  const steering = pane === "steered" ? steeringOptions() : {};
  body.max_tokens = number("max-tokens");
  if (!steering.diffadapt) body.temperature = number("temperature");  // DiffAdapt picks it per class
  if (number("top-p") !== null && number("top-p") !== 1) body.top_p = number("top-p");
  if (number("top-k") !== null && number("top-k") !== -1) body.top_k = number("top-k");
  if (number("min-p")) body.min_p = number("min-p");
  if (number("seed") !== null) body.seed = number("seed");
  if (!steering.particles && !steering.deepconf) {  // these run their own requests: no logprobs there
    if (mode() === "chat") { body.logprobs = true; body.top_logprobs = TOP_LOGPROBS; } else body.logprobs = TOP_LOGPROBS;
  }
  body.stream = true;
  body.steering = { ...steering, return_entropy: true };
  return body;
}

const endpoint = () => (mode() === "chat" ? "/v1/chat/completions" : "/v1/completions");

function python(value, indent = "") {
  const inner = indent + "    ";
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + python(v, inner)).join(",\n")},\n${indent}]`;
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "{}";
    return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)}`).join(",\n")},\n${indent}}`;
  }
  return JSON.stringify(value);
}

// Fields the OpenAI SDK takes as arguments; the rest travel in extra_body.
const SDK_FIELDS = new Set(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream", "logprobs", "top_logprobs"]);

function updateSnippet() {
  if (!state.model) return;
  const body = buildRequest("steered");
  const json = JSON.stringify(body, null, 2);
  const base = `${location.origin}/v1`;
  $("snippet-json").textContent = json;
  $("snippet-curl").textContent =
    `curl -N ${location.origin}${endpoint()} \\\n  -H "Authorization: Bearer $STEER_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d @- <<'EOF'\n${json}\nEOF`;
  const args = Object.entries(body).filter(([k]) => SDK_FIELDS.has(k)).map(([k, v]) => `    ${k}=${python(v, "    ")},`);
  const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !SDK_FIELDS.has(k)));
  const call = mode() === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const print = mode() === "chat" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
  $("snippet-python").textContent = [
    "import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=os.environ.get("STEER_API_KEY", "none"))`,
    `stream = ${call}(`, ...args, `    extra_body=${python(extra, "    ")},`, ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    `        print(${print}, end="", flush=True)`,
  ].join("\n");
}

// --- answers ----------------------------------------------------------------------------

function tokensOf(choice) {
  const logprobs = choice.logprobs;
  if (!logprobs) return [];
  if (logprobs.content) {  // chat
    return logprobs.content.map((c) => ({ text: c.token, logprob: c.logprob, top: (c.top_logprobs || []).map((t) => [t.token, t.logprob]) }));
  }
  return (logprobs.tokens || []).map((text, i) => ({  // completions
    text, logprob: logprobs.token_logprobs[i], top: Object.entries(logprobs.top_logprobs?.[i] || {}),
  }));
}

function startTurn(paneName, body) {
  const pane = $(`pane-${paneName}`);
  const log = pane.querySelector(".log");
  if (mode() === "completion" || !state.history[paneName].length) log.replaceChildren();
  log.querySelectorAll(".answer").forEach((a) => a.classList.remove("latest"));
  log.append(el("p", { class: mode() === "chat" ? "user" : "prompt", text: mode() === "chat" ? body.messages.at(-1).content : body.prompt }));
  const answer = el("p", { class: "answer latest", tabindex: 0, "aria-label": "answer; arrow keys move between tokens" });
  log.append(answer);
  pane.dataset.state = "running";
  pane.querySelector(".status").textContent = "generating…";
  return answer;
}

function appendToken(run, token) {
  const index = run.tokens.length;
  run.tokens.push(token);
  const span = el("span", {
    class: "tok", tabindex: -1, text: token.text,
    "data-index": index, "data-bucket": bucketOf(token.entropy),
    "data-entropy": token.entropy ?? "", "data-pane": run.pane,
  });
  run.answer.append(span);
}

async function generate(paneName, body, signal) {
  const answer = startTurn(paneName, body);
  const run = { pane: paneName, answer, tokens: [], text: "", report: null, progress: [], deepconf: [], entropy: null, varentropy: null };
  state.runs[paneName] = run;
  const pane = $(`pane-${paneName}`);
  try {
    const response = await api(endpoint(), { method: "POST", body: JSON.stringify(body), signal });
    for await (const event of events(response)) {
      if (event.error) throw new ApiError(event.error.message, event.error.code);
      const progress = event.steering?.particles?.progress;
      if (progress) {
        run.progress.push(progress);
        renderParticles();
      }
      const deepconf = event.steering?.deepconf?.progress;
      if (deepconf) {
        run.deepconf.push(deepconf);
        renderDeepConf();
      }
      for (const choice of event.choices || []) {
        const tokens = tokensOf(choice);
        const entropy = choice.steering?.chunk_entropy || [];
        const varentropy = choice.steering?.chunk_varentropy || [];
        tokens.forEach((token, i) => appendToken(run, { ...token, entropy: entropy[i] ?? null, varentropy: varentropy[i] ?? null }));
        const text = choice.delta?.content ?? choice.text ?? "";
        run.text += text;
        if (!tokens.length && text) answer.append(el("span", { class: "untokenised", text }));
        if (choice.finish_reason) {
          run.report = choice.steering || null;
          run.finish = choice.finish_reason;
        }
      }
      drawChart();
    }
    if (run.report?.token_entropy && !run.tokens.length) {  // a particle-filter answer
      run.entropy = run.report.token_entropy;
      run.varentropy = run.report.token_varentropy;
    }
    if (mode() === "chat") state.history[paneName].push(body.messages.at(-1), { role: "assistant", content: run.text });
    pane.dataset.state = "done";
    pane.querySelector(".status").textContent = summary(run);
  } catch (error) {
    pane.dataset.state = "error";
    pane.querySelector(".status").textContent = error.name === "AbortError" ? "stopped" : "failed";
    if (error.name !== "AbortError") {
      showError(error.message);
      if (error.status === 401) askForKey(error.message);
    }
  }
  drawChart();
  renderReports();
}

function summary(run) {
  const e = run.report?.entropy;
  const parts = [`${run.tokens.length || run.entropy?.length || 0} tokens`, `finish: ${run.finish}`];
  if (e?.mean !== null && e?.mean !== undefined) parts.push(`mean entropy ${e.mean.toFixed(3)} nats`, `max ${e.max.toFixed(3)}`);
  return parts.join(" · ");
}

async function send(event) {
  event.preventDefault();
  if (!state.model) return connect();
  showError("");
  const compare = $("compare").checked;
  $("pane-plain").hidden = !compare;
  $("panes").classList.toggle("compare", compare);
  $("particles-view").hidden = true;
  $("deepconf-view").hidden = true;
  $("diffadapt-view").hidden = true;
  state.runs = {};
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const panes = compare ? ["steered", "plain"] : ["steered"];
  const bodies = panes.map((p) => buildRequest(p));
  await Promise.all(panes.map((p, i) => generate(p, bodies[i], state.controller.signal)));
  $("send").disabled = false;
  $("stop").disabled = true;
  updateSnippet();
}

function showError(message) {
  $("error").textContent = message;
}

// --- the token tooltip ------------------------------------------------------------------

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function showTooltip(span) {
  const run = state.runs[span.dataset.pane];
  const token = run?.tokens[Number(span.dataset.index)];
  if (!token) return;
  const tip = $("tooltip");
  const rows = token.top.map(([text, logprob]) => el("tr", {},
    el("td", { class: "mono", text: JSON.stringify(text) }), el("td", { text: fmt(logprob) }), el("td", { text: `${(100 * Math.exp(logprob)).toFixed(1)}%` })));
  tip.replaceChildren(
    el("p", { class: "mono", text: `${JSON.stringify(token.text)} · token ${Number(span.dataset.index) + 1}` }),
    el("p", { text: `entropy ${fmt(token.entropy)} nats · varentropy ${fmt(token.varentropy)}` }),
    el("p", { text: `log-prob ${fmt(token.logprob)} (p ${token.logprob === null ? "–" : (100 * Math.exp(token.logprob)).toFixed(1) + "%"})` }),
    ...(rows.length ? [el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "alternative" }), el("th", { text: "log-prob" }), el("th", { text: "p" }))), el("tbody", {}, ...rows))] : []),
  );
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const width = tip.offsetWidth;
  tip.style.left = `${Math.max(4, Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - width - 4))}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  document.querySelectorAll(".tok.active").forEach((t) => t.classList.remove("active"));
  span.classList.add("active");
}

function hideTooltip() {
  $("tooltip").hidden = true;
  document.querySelectorAll(".tok.active").forEach((t) => t.classList.remove("active"));
}

document.addEventListener("mouseover", (e) => { if (e.target.classList?.contains("tok")) showTooltip(e.target); });
document.addEventListener("mouseout", (e) => { if (e.target.classList?.contains("tok")) hideTooltip(); });
document.addEventListener("focusin", (e) => { if (e.target.classList?.contains("tok")) showTooltip(e.target); });
document.addEventListener("click", (e) => {
  if (e.target.classList?.contains("tok")) e.target.focus();
  else if (!e.target.closest?.(".tooltip")) hideTooltip();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") return hideTooltip();
  const answer = e.target.closest?.(".answer");
  if (!answer || !["ArrowRight", "ArrowLeft", "Home", "End"].includes(e.key)) return;
  const tokens = [...answer.querySelectorAll(".tok")];
  if (!tokens.length) return;
  const at = tokens.indexOf(document.activeElement);
  const next = { ArrowRight: at + 1, ArrowLeft: at < 0 ? 0 : at - 1, Home: 0, End: tokens.length - 1 }[e.key];
  tokens[Math.max(0, Math.min(tokens.length - 1, next))].focus();
  e.preventDefault();
});

// --- legend and chart -------------------------------------------------------------------

function buildLegend() {
  const labels = ENTROPY_EDGES.map((edge, i) => (i === 0 ? `< ${edge}` : `${ENTROPY_EDGES[i - 1]}–${edge}`));
  labels.push(`≥ ${ENTROPY_EDGES.at(-1)}`);
  $("legend").replaceChildren(el("span", { class: "legend-title", text: "entropy (nats)" }),
    ...labels.map((label, i) => el("span", { class: "swatch", "data-bucket": String(i), text: label })),
    el("span", { class: "swatch", "data-bucket": "none", text: "not measured" }));
}

const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}) => {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};

function seriesOf(run) {
  if (run.entropy) return { entropy: run.entropy, varentropy: run.varentropy || [] };
  return { entropy: run.tokens.map((t) => t.entropy), varentropy: run.tokens.map((t) => t.varentropy) };
}

function drawChart() {
  const chart = $("chart");
  const width = Math.max(280, chart.clientWidth || 600);
  const height = 220;
  const pad = { left: 40, right: 12, top: 18, bottom: 26 };
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.replaceChildren();
  const runs = Object.values(state.runs);
  const all = runs.map((run) => ({ run, ...seriesOf(run) }));
  const length = Math.max(1, ...all.map((s) => s.entropy.length));
  const values = all.flatMap((s) => [...s.entropy, ...s.varentropy]).filter((v) => v !== null && v !== undefined);
  const top = Math.max(1, ...values) * 1.05;
  const x = (i) => pad.left + (length === 1 ? 0 : (i / (length - 1)) * (width - pad.left - pad.right));
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  for (let t = 0; t <= 4; t++) {
    const v = (top * t) / 4;
    chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: "grid" }));
    const label = svg("text", { x: pad.left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" });
    label.textContent = v.toFixed(1);
    chart.append(label);
  }
  const xLabel = svg("text", { x: width - pad.right, y: height - 6, class: "axis", "text-anchor": "end" });
  xLabel.textContent = `token (1–${length})`;
  chart.append(xLabel);
  for (const { run, entropy, varentropy } of all) {
    for (const [name, series] of [["varentropy", varentropy], ["entropy", entropy]]) {
      const points = series.map((v, i) => (v === null || v === undefined ? null : `${x(i)},${y(v)}`)).filter(Boolean);
      chart.append(svg("polyline", { points: points.join(" "), class: `line ${name} ${run.pane}` }));
    }
    entropy.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const dot = svg("circle", { cx: x(i), cy: y(v), r: 2.5, class: `pt ${run.pane}`, "data-pane": run.pane, "data-index": i });
      const title = svg("title");
      title.textContent = `${run.pane} token ${i + 1}: entropy ${v.toFixed(3)}`;
      dot.append(title);
      chart.append(dot);
    });
    for (const marker of markersOf(run)) {
      const mx = x(marker.index);
      const shape = marker.kind === "gate"
        ? svg("path", { d: `M${mx - 4},${pad.top - 12} L${mx + 4},${pad.top - 12} L${mx},${pad.top - 4} Z` })
        : svg("path", { d: `M${mx},${pad.top - 13} L${mx + 4},${pad.top - 8} L${mx},${pad.top - 3} L${mx - 4},${pad.top - 8} Z` });
      shape.setAttribute("class", `marker ${marker.kind} ${run.pane}`);
      shape.setAttribute("data-index", marker.index);
      const title = svg("title");
      title.textContent = marker.label;
      shape.append(title);
      chart.append(shape);
    }
  }
  const key = ["entropy: solid line, varentropy: dashed"];
  if (runs.length > 1) key.push("blue: with steering, grey: without");
  if (runs.some((r) => markersOf(r).some((m) => m.kind === "gate"))) key.push("▼ a gate fired");
  if (runs.some((r) => markersOf(r).some((m) => m.kind === "vreason"))) key.push("◆ V-Reason updated");
  $("chart-key").textContent = key.join(" · ");
}

function markersOf(run) {
  const report = run.report || {};
  const markers = [];
  (report.gates?.gates || []).forEach((gate, g) => gate.fired.forEach((index, k) => markers.push({
    kind: "gate", index, label: `gate ${g + 1} (${gate.signal} ${fmt(gate.values[k])}) fired at token ${index + 1}`,
  })));
  for (const update of report.vreason?.updates || []) {
    markers.push({ kind: "vreason", index: update.token, label: `V-Reason update after ${update.token} tokens: entropy ${fmt(update.entropy_before)} → ${fmt(update.entropy_after)}` });
  }
  return markers;
}

// --- reports ----------------------------------------------------------------------------

function renderParticles() {
  const run = state.runs.steered;
  const view = $("particles-view");
  if (!run?.progress.length) return;
  view.hidden = false;
  const final = run.report?.particles;
  view.replaceChildren(el("h3", { text: "Particle filter" }), ...run.progress.map((step) => el("div", { class: "pf-step", "data-step": step.step },
    el("p", { text: `step ${step.step} · live ${step.live} · ESS ${fmt(step.ess, 2)} · T ${fmt(step.temperature, 2)} · ${step.resampled ? `resampled → ancestors ${step.ancestors.join(", ")} (${step.distinct_ancestors} distinct)` : "not resampled"} · best score ${fmt(step.best_score)}` }),
    el("div", { class: "weights", "aria-label": `weights at step ${step.step}` }, ...step.weights.map((w, i) => el("span", {
      class: "weight", title: `particle ${i}: weight ${fmt(w)}`, style: `--w:${Math.max(2, 100 * w)}%`, "data-weight": w,
    }, el("span", { class: "weight-label", text: `${i}: ${fmt(w, 2)}` })))))),
  ...(final?.chosen !== undefined ? [el("p", { class: "pf-final", text: `chosen particle ${final.chosen} · final scores ${final.final_scores.map((s) => fmt(s)).join(", ")} · ${final.resamples} resamples` })] : []));
}

// DeepConf: each trace as its events tell it, then the vote and the saving from the report.
function renderDeepConf() {
  const run = state.runs.steered;
  const view = $("deepconf-view");
  if (!run?.deepconf.length) return;
  view.hidden = false;
  const final = run.report?.deepconf;
  const traces = new Map();  // index -> {phase, status}
  let threshold = null;
  let consensus = null;
  for (const e of run.deepconf) {
    if (e.event === "started") traces.set(e.trace, { phase: e.phase, status: "running" });
    else if (e.event === "stopped") traces.get(e.trace).status = `stopped early at token ${e.at}`;
    else if (e.event === "finished") traces.get(e.trace).status = `finished: ${e.answer ?? "no answer"}, score ${fmt(e.score)}`;
    else if (e.event === "cancelled") traces.get(e.trace).status = `cancelled after ${e.tokens} tokens`;
    else if (e.event === "threshold") threshold = e.threshold;
    else if (e.event === "consensus") consensus = e;
  }
  threshold = final?.threshold ?? threshold;
  const voted = new Set((final?.traces || []).filter((t) => t.voted).map((t) => t.index));
  const votes = Object.entries(final?.votes || {});
  const total = votes.reduce((sum, [, w]) => sum + w, 0);
  view.replaceChildren(el("h3", { text: "DeepConf" }),
    ...(threshold !== null ? [el("p", { class: "dc-threshold", text: `confidence threshold ${fmt(threshold)}` })] : []),
    ...[...traces].map(([index, t]) => el("p", { class: "dc-trace", "data-trace": index,
      text: `trace ${index} (${t.phase}) · ${t.status}${voted.has(index) ? " · voted" : ""}` })),
    ...(consensus ? [el("p", { text: `consensus: ${consensus.answer} holds ${(100 * consensus.share).toFixed(1)}% of the vote` })] : []),
    ...votes.map(([answer, w]) => el("div", { class: "bar dc-vote", "data-answer": answer, style: `--w:${total ? (100 * w) / total : 0}%` },
      el("span", { text: `${answer}: ${total ? ((100 * w) / total).toFixed(1) : "0.0"}% (weight ${fmt(w)})` }))),
    ...(final ? [el("p", { class: "dc-final", text: `answer ${final.answer ?? "none"} · chosen trace ${final.chosen} · ${final.generated_tokens} tokens generated, about ${final.saved_tokens} saved` })] : []));
}

function renderReports() {
  renderParticles();
  renderDeepConf();
  const report = state.runs.steered?.report;
  const diff = report?.diffadapt;
  const view = $("diffadapt-view");
  view.hidden = !diff;
  if (diff) {
    const strategy = diff.strategy;
    const topP = strategy.top_p == null ? "" : `, top-p ${strategy.top_p}`;
    view.replaceChildren(el("h3", { text: `DiffAdapt (${diff.recipe} recipe): ${diff.difficulty}` }),
      ...Object.entries(diff.probabilities || {}).map(([name, p]) => el("div", { class: "bar", "data-class": name, style: `--w:${100 * p}%` },
        el("span", { text: `${name} ${(100 * p).toFixed(1)}%` }))),
      el("p", { text: `strategy: temperature ${strategy.temperature}${topP}, budget ${strategy.budget} (${strategy.max_tokens} tokens)` }),
      ...(diff.continued ? [el("p", { class: "continued", text: `cut off at its budget, then continued after ${JSON.stringify(diff.continuation.prefix)}: ${diff.continued.tokens} tokens (${diff.continued.finish_reason})` })] : []),
      el("pre", { class: "code", text: strategy.prompt + (strategy.prefill ? `\n\n[assistant] ${strategy.prefill}` : "") }));
  }
  const lines = [];
  for (const east of report?.east || []) lines.push(`EAST: ${east.vector} × ${east.scale} at layer ${east.layers.join(", ")} (${east.positions} positions)`);
  for (const gate of report?.gates?.gates || []) lines.push(`gate on ${gate.signal}: fired at ${gate.fired_count} tokens, then ${JSON.stringify(gate.then)}`);
  if (report?.vreason) lines.push(`V-Reason: ${report.vreason.updates.length} updates${report.vreason.error ? ` (${report.vreason.error})` : ""}`);
  for (const { name, schemaName } of state.panels) {  // the others: their settings
    const section = report?.[name];
    if (!section || name === "vreason" || name === "particles" || name === "deepconf") continue;
    const settings = Object.entries(section).filter(([, v]) => v !== null && typeof v !== "object");
    lines.push(`${state.schemas[schemaName].title || name}: ${settings.map(([k, v]) => `${k} ${v}`).join(", ")}`);
  }
  $("methods-view").hidden = !lines.length;
  $("methods-view").replaceChildren(el("h3", { text: "Steering report" }), el("ul", {}, ...lines.map((l) => el("li", { text: l }))));
}

// --- wiring -----------------------------------------------------------------------------

function syncMode() {
  const chat = mode() === "chat";
  document.querySelectorAll(".chat-only").forEach((x) => { x.hidden = !chat; });
  $("prompt-label").textContent = chat ? "Message" : "Prompt";
  updateSnippet();
}

$("request-form").addEventListener("submit", send);
$("request-form").addEventListener("input", updateSnippet);
$("request-form").addEventListener("change", updateSnippet);
document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", syncMode));
$("add-gate").addEventListener("click", addGate);
$("stop").addEventListener("click", () => state.controller?.abort());
$("clear").addEventListener("click", () => {
  state.history = { steered: [], plain: [] };
  document.querySelectorAll(".log").forEach((l) => l.replaceChildren());
  updateSnippet();
});
$("east-vector").addEventListener("change", () => {
  const vector = state.vectors.find((v) => v.id === $("east-vector").value);
  $("east-layer").placeholder = vector ? `${vector.layer} (the vector's)` : "the vector's";
});
document.querySelectorAll(".tabs [data-snippet]").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tabs [data-snippet]").forEach((t) => t.setAttribute("aria-selected", String(t === tab)));
  for (const name of ["curl", "python", "json"]) $(`snippet-${name}`).hidden = name !== tab.dataset.snippet;
}));
$("copy").addEventListener("click", async () => {
  const shown = document.querySelector(".snippet pre:not([hidden])");
  try {
    await navigator.clipboard.writeText(shown.textContent);
    $("copy").textContent = "Copied";
  } catch (_) {  // no clipboard permission (plain http): select it for Ctrl+C
    getSelection().selectAllChildren(shown);
    $("copy").textContent = "Selected";
  }
  setTimeout(() => { $("copy").textContent = "Copy"; }, 1500);
});
window.addEventListener("resize", drawChart);

buildLegend();
syncMode();
connect();
