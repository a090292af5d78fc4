// The gpt2lab playground: streams from the server's own OpenAI API (/v1) and reads the model's
// insides through /api. No libraries, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("gpt2lab-key") || "",
  info: null,
  mode: "complete",
  messages: [],       // chat history: {role, content}
  prompt: "",         // the prompt of the current completion
  generated: "",      // its generated text so far
  controller: null,   // the running request's AbortController
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined
    ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (r.status === 401) { askForKey(); throw new Error("this server needs an API key"); }
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

// ---- start-up ----

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    $("model-info").textContent = e.message;
    return;
  }
  const i = state.info;
  $("model-info").textContent =
    `${i.model} · ${i.n_layer} layers × ${i.n_head} heads · context ${i.context}`;
  $("max-tokens").max = i.limits.max_tokens;
  fillSelect($("layer"), i.n_layer, "layer");
  fillSelect($("head"), i.n_head, "head");
  if (i.chat) {
    $("mode-switch").hidden = false;
    setMode("chat");
  }
  $("key-form").hidden = true;
}

function fillSelect(select, n, what) {
  select.innerHTML = "";
  for (let k = 0; k < n; k++) {
    const o = document.createElement("option");
    o.value = k; o.textContent = `${what} ${k}`;
    select.appendChild(o);
  }
}

function setMode(mode) {
  state.mode = mode;
  $("mode-complete").classList.toggle("on", mode === "complete");
  $("mode-chat").classList.toggle("on", mode === "chat");
  $("complete-view").hidden = mode !== "complete";
  $("chat-view").hidden = mode !== "chat";
}

// ---- settings ----

function settings() {
  const body = {
    model: state.info ? state.info.model : "model",
    temperature: Number($("temperature").value),
    max_tokens: Math.max(1, Number($("max-tokens").value) || 16),
    stream: true,
  };
  const topP = Number($("top-p").value);
  if (topP < 1) body.top_p = topP;
  const topK = Number($("top-k").value);
  if (topK > 0) body.top_k = topK;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const stops = $("stop-strings").value.split(",")
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
    .filter((s) => s.length > 0).slice(0, 4);
  if (stops.length) body.stop = stops;
  return body;
}

// ---- generation ----

async function generate() {
  if (state.controller) return;
  const body = settings();
  let path;
  if (state.mode === "chat") {
    const text = $("chat-input").value;
    if (!text.trim()) return;
    state.messages.push({ role: "user", content: text });
    $("chat-input").value = "";
    renderChat();
    body.messages = state.messages.slice();
    body.logprobs = true;
    body.top_logprobs = 5;
    path = "/v1/chat/completions";
    state.prompt = "";
  } else {
    body.prompt = $("prompt").value;
    body.logprobs = 5;
    path = "/v1/completions";
    state.prompt = body.prompt;
  }
  state.generated = "";
  clearOutput();
  if (state.mode === "complete") addPrompt(state.prompt);
  setBusy(true);
  let live = null;  // chat: the reply as it streams in
  if (state.mode === "chat") {
    live = document.createElement("div");
    live.className = "msg assistant";
    $("chat-log").appendChild(live);
  }
  const started = performance.now();
  let count = 0, first = null, finish = null;
  state.controller = new AbortController();
  try {
    const r = await fetch(path, {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (r.status === 401) { askForKey(); throw new Error("this server needs an API key"); }
    if (!r.ok) {
      const data = await r.json();
      throw new Error(data.error ? data.error.message : r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const step = readChoice(choice);
        if (step.token !== null) {
          if (first === null) first = performance.now();
          count++;
          addToken(step.token, step.logprob, step.top);
        }
        if (step.text) {
          state.generated += step.text;
          if (live) live.textContent = state.generated;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const secs = (performance.now() - started) / 1000;
      setStatus(`${count} tokens · ${secs.toFixed(1)} s`);
    }
    const total = (performance.now() - started) / 1000;
    const ttft = first === null ? "" : ` · first token ${((first - started) / 1000).toFixed(2)} s`;
    setStatus(`${count} tokens in ${total.toFixed(1)} s${ttft} · ${finish || "stopped"}`);
  } catch (e) {
    if (e.name === "AbortError") setStatus(`stopped after ${count} tokens`);
    else setStatus(e.message, true);
  } finally {
    state.controller = null;
    setBusy(false);
    if (state.mode === "chat" && state.generated) {
      state.messages.push({ role: "assistant", content: state.generated });
      renderChat();
    }
    refreshPanels();
  }
}

// Server-sent events: yields each `data:` object until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// One streamed choice: its token (with logprob and top 5) and its new text.
function readChoice(choice) {
  const out = { token: null, logprob: null, top: [], text: "" };
  if (choice.delta) {  // chat
    out.text = choice.delta.content || "";
    const lp = choice.logprobs && choice.logprobs.content && choice.logprobs.content[0];
    if (lp) {
      out.token = lp.token; out.logprob = lp.logprob;
      out.top = (lp.top_logprobs || []).map((t) => [t.token, t.logprob]);
    }
  } else {
    out.text = choice.text || "";
    const lp = choice.logprobs;
    if (lp && lp.tokens && lp.tokens.length) {
      out.token = lp.tokens[0]; out.logprob = lp.token_logprobs[0];
      out.top = Object.entries(lp.top_logprobs[0] || {});
    }
  }
  return out;
}

function stop() {
  if (state.controller) state.controller.abort();  // closing the stream frees the server's slot
}

// ---- the output and token view ----

function clearOutput() {
  $("output").innerHTML = "";
  hideTip();
}

function addPrompt(text) {
  const span = document.createElement("span");
  span.className = "prompt";
  span.textContent = text;
  $("output").appendChild(span);
}

function probColor(p) {
  const hue = Math.round(120 * Math.max(0, Math.min(1, p)));  // red (unlikely) to green
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  return dark ? `hsl(${hue} 45% 32%)` : `hsl(${hue} 75% 80%)`;
}

function addToken(token, logprob, top) {
  const span = document.createElement("span");
  const p = Math.exp(logprob);
  span.className = "tok";
  span.tabIndex = 0;
  span.textContent = token.startsWith("bytes:") ? "\ufffd" : token;
  span.style.background = probColor(p);
  span.dataset.p = p.toFixed(4);
  span.dataset.top = JSON.stringify(top);
  span.dataset.token = token;
  span.setAttribute("aria-label", `${token} probability ${(100 * p).toFixed(1)}%`);
  $("output").appendChild(span);
  const out = $("output");
  out.scrollTop = out.scrollHeight;
}

function visible(s) {
  return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function showTip(span) {
  const top = JSON.parse(span.dataset.top || "[]");
  const tip = $("tooltip");
  const rows = top.map(([t, lp]) => {
    const chosen = t === span.dataset.token ? ' class="chosen"' : "";
    return `<tr${chosen}><td>${escapeHtml(visible(t))}</td>` +
      `<td class="p">${(100 * Math.exp(lp)).toFixed(1)}%</td></tr>`;
  }).join("");
  tip.innerHTML = `<div><b>${escapeHtml(visible(span.dataset.token))}</b> ` +
    `<span class="muted">${(100 * Number(span.dataset.p)).toFixed(1)}%</span></div>` +
    `<table>${rows}</table>`;
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const w = tip.offsetWidth, h = tip.offsetHeight;
  let x = Math.min(box.left, window.innerWidth - w - 8);
  let y = box.bottom + 6;
  if (y + h > window.innerHeight) y = box.top - h - 6;
  tip.style.left = Math.max(4, x) + "px";
  tip.style.top = Math.max(4, y) + "px";
}

function hideTip() { $("tooltip").hidden = true; }

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---- chat ----

function renderChat() {
  const log = $("chat-log");
  log.innerHTML = "";
  for (const m of state.messages) {
    const div = document.createElement("div");
    div.className = "msg " + (m.role === "user" ? "user" : "assistant");
    div.textContent = m.content;
    log.appendChild(div);
  }
  log.scrollTop = log.scrollHeight;
}

// ---- tokenizer and attention panels ----

function currentText() {
  if (state.mode === "chat") {
    return state.messages.map((m) => m.content).join("\n") || $("chat-input").value;
  }
  return (state.prompt + state.generated) || $("prompt").value;
}

function refreshPanels() {
  if ($("tokenizer-panel").open) showPieces();
  if ($("inside-panel").open) showAttention();
}

async function showPieces() {
  const box = $("pieces");
  const text = currentText();
  if (!text) { box.textContent = "(no text yet)"; return; }
  try {
    const t = await api("/api/tokenize", { text });
    box.innerHTML = "";
    t.pieces.forEach((piece, k) => {
      const div = document.createElement("span");
      div.className = "piece";
      div.innerHTML = `${escapeHtml(piece)}<small>${t.ids[k]}</small>`;
      box.appendChild(div);
    });
  } catch (e) {
    box.textContent = e.message;
  }
}

async function showAttention() {
  const text = currentText();
  const note = $("inside-note");
  if (!text) { note.textContent = "Generate or type some text first."; return; }
  try {
    const a = await api("/api/attention", {
      text, layer: Number($("layer").value), head: Number($("head").value),
    });
    note.textContent = `Layer ${a.layer}, head ${a.head}: row = a token, column = a token it ` +
      `attends to (darker = more)` + (a.cropped ? "; the last tokens only." : ".");
    drawAttention(a);
  } catch (e) {
    note.textContent = e.message;
  }
}

function drawAttention(a) {
  const canvas = $("attention");
  const n = a.pieces.length;
  const labels = a.pieces.map((p) => p.length > 10 ? p.slice(0, 9) + "…" : p);
  const ctx = canvas.getContext("2d");
  const font = "11px ui-monospace, monospace";
  ctx.font = font;
  const margin = Math.ceil(Math.max(...labels.map((l) => ctx.measureText(l).width))) + 8;
  const avail = Math.max(120, $("attention-wrap").clientWidth - margin - 4);
  const cell = Math.max(6, Math.min(28, Math.floor(avail / n)));
  const ratio = window.devicePixelRatio || 1;
  const size = margin + cell * n;
  canvas.width = size * ratio; canvas.height = size * ratio;
  canvas.style.width = size + "px"; canvas.style.height = size + "px";
  ctx.scale(ratio, ratio);
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  ctx.fillStyle = dark ? "#1e2125" : "#ffffff";
  ctx.fillRect(0, 0, size, size);
  ctx.font = font;
  ctx.fillStyle = dark ? "#e8e9eb" : "#1d1f21";
  ctx.textBaseline = "middle";
  if (cell >= 9) {
    labels.forEach((l, i) => {
      ctx.textAlign = "right";
      ctx.fillText(l, margin - 4, margin + cell * i + cell / 2);  // queries, down the left
      ctx.save();
      ctx.translate(margin + cell * i + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(l, 0, 0);  // keys, along the top
      ctx.restore();
    });
  }
  a.attention.forEach((row, i) => row.forEach((v, j) => {
    if (j > i) return;
    ctx.fillStyle = `rgba(36, 87, 197, ${Math.sqrt(v).toFixed(3)})`;
    ctx.fillRect(margin + cell * j, margin + cell * i, cell - 1, cell - 1);
  }));
  canvas.onmousemove = (ev) => {
    const r = canvas.getBoundingClientRect();
    const j = Math.floor((ev.clientX - r.left - margin) / cell);
    const i = Math.floor((ev.clientY - r.top - margin) / cell);
    if (i >= 0 && j >= 0 && i < n && j <= i) {
      $("attention-hover").textContent =
        `${visible(a.texts[i])} → ${visible(a.texts[j])}: ${(100 * a.attention[i][j]).toFixed(1)}%`;
    }
  };
}

// ---- wiring ----

function setBusy(busy) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
}

function setStatus(text, error = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

function wire() {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    state.messages = []; state.prompt = ""; state.generated = "";
    renderChat(); clearOutput(); setStatus("");
    if (state.mode === "complete") $("prompt").value = "";
  });
  $("mode-complete").addEventListener("click", () => setMode("complete"));
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  for (const id of ["temperature", "top-p"]) {
    $(id).addEventListener("input", () => { $(id + "-out").textContent = $(id).value; });
  }
  for (const id of ["prompt", "chat-input"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    });
  }
  const out = $("output");
  out.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
  out.addEventListener("mouseout", (e) => { if (e.target.classList.contains("tok")) hideTip(); });
  out.addEventListener("focusin", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
  out.addEventListener("focusout", hideTip);
  out.addEventListener("click", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
  window.addEventListener("scroll", hideTip, { passive: true });
  $("tokenizer-panel").addEventListener("toggle", () => { if ($("tokenizer-panel").open) showPieces(); });
  $("inside-panel").addEventListener("toggle", () => { if ($("inside-panel").open) showAttention(); });
  $("show-attention").addEventListener("click", showAttention);
  $("layer").addEventListener("change", showAttention);
  $("head").addEventListener("change", showAttention);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem("gpt2lab-key", state.key);
    $("key-form").hidden = true;
    init();
  });
}

wire();
init();
