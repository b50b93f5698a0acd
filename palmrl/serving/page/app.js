// palmrl serve's page: chat (streamed), blind comparisons and labels, stats.
// Model output is only ever put into the page with textContent: it can never become markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, history: [], controller: null, pair: null };

function annotatorId() {
  let id = localStorage.getItem("palmrl-annotator");
  if (!id || !/^[A-Za-z0-9_-]{1,64}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    id = "anon-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("palmrl-annotator", id);
  }
  return id;
}

function sampling() {
  return {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value))),
  };
}

function say(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// tabs

function show(view) {
  for (const tab of document.querySelectorAll("nav button")) {
    const on = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(on));
    $("view-" + tab.dataset.view).hidden = !on;
  }
  if (view === "stats") loadStats();
}

// chat

function bubble(role, text, who) {
  const li = document.createElement("li");
  li.className = role;
  if (who) {
    const tag = document.createElement("span");
    tag.className = "who";
    tag.textContent = who;
    li.append(tag);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("messages").append(li);
  return li;
}

// Reads an OpenAI SSE stream, calling onDelta(text) per content piece; returns the finish reason.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  input.value = "";
  const model = $("chat-model").value;
  state.history.push({ role: "user", content: text });
  bubble("user", text);
  const li = bubble("assistant", "", model);
  const out = li.querySelector(".text");
  li.dataset.chunks = "0";
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  say("chat-status", "generating…");
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: state.controller.signal,
      body: JSON.stringify({ model, messages: state.history, stream: true, ...sampling() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const finish = await readStream(response, (piece) => {
      reply += piece;
      out.textContent = reply;
      li.dataset.chunks = String(Number(li.dataset.chunks) + 1);
    });
    say("chat-status", finish === "length" ? "stopped at max tokens" : "");
  } catch (err) {
    if (err.name === "AbortError") say("chat-status", "stopped");
    else say("chat-status", String(err.message || err), true);
  } finally {
    state.history.push({ role: "assistant", content: reply });
    li.dataset.done = "1";
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// compare and label

function setVerdictButtons(enabled) {
  for (const b of document.querySelectorAll(".pick")) b.disabled = !enabled;
}

async function compare(event) {
  event.preventDefault();
  const prompt = $("compare-prompt").value;
  if (!prompt.trim()) return;
  $("compare-go").disabled = true;
  setVerdictButtons(false);
  state.pair = null;
  for (const side of ["A", "B"]) { $("answer-" + side).textContent = ""; $("rate-" + side).value = ""; }
  say("compare-status", "generating both answers…");
  try {
    const pair = await postJSON("/ui/compare", { prompt, annotator: annotatorId(), ...sampling() });
    state.pair = pair;
    $("answer-A").textContent = pair.answers.A;
    $("answer-B").textContent = pair.answers.B;
    setVerdictButtons(true);
    say("compare-status", "Which answer is better? (the models stay hidden until you choose)");
  } catch (err) {
    say("compare-status", String(err.message || err), true);
  } finally {
    $("compare-go").disabled = false;
  }
}

async function judge(choice) {
  if (!state.pair) return;
  const rating = (side) => ($("rate-" + side).value ? Number($("rate-" + side).value) : null);
  const ratings = { A: rating("A"), B: rating("B") };
  if (!choice && ratings.A === null && ratings.B === null) {
    say("compare-status", "choose a rating first (or pick a verdict)", true);
    return;
  }
  setVerdictButtons(false);
  try {
    const saved = await postJSON("/ui/judge", { id: state.pair.id, annotator: annotatorId(), choice: choice || null, ratings });
    state.pair = null;
    say("compare-status", `saved (${saved.choice || "ratings"}): A was ${saved.models.A}, B was ${saved.models.B}`);
    $("compare-status").dataset.saved = String(Number($("compare-status").dataset.saved || 0) + 1);
    if (state.config.queue) nextPrompt();
  } catch (err) {
    setVerdictButtons(true);
    say("compare-status", String(err.message || err), true);
  }
}

async function nextPrompt() {
  try {
    const response = await fetch("/ui/next?annotator=" + encodeURIComponent(annotatorId()));
    if (!response.ok) throw new Error(await errorText(response));
    const next = await response.json();
    if (next.done) {
      say("queue-status", `queue finished (${next.total} prompts)`);
      return;
    }
    $("compare-prompt").value = next.prompt;
    say("queue-status", `prompt ${next.index + 1} of ${next.total}`);
  } catch (err) {
    say("queue-status", String(err.message || err), true);
  }
}

// stats

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
}

async function loadStats() {
  try {
    const response = await fetch("/ui/stats");
    if (!response.ok) throw new Error(await errorText(response));
    const stats = await response.json();
    const agreement = stats.agreement.pairs
      ? `; annotators agreed on ${stats.agreement.agreed} of ${stats.agreement.pairs} shared comparisons`
      : "";
    say("stats-summary", `${stats.judgements} judgements by ${stats.annotators} annotator(s)${agreement}`);
    const body = $("stats-table").querySelector("tbody");
    body.replaceChildren();
    for (const m of stats.models) {
      const row = document.createElement("tr");
      cell(row, m.name);
      for (const key of ["comparisons", "wins", "losses", "ties", "both_bad"]) cell(row, String(m[key]));
      cell(row, m.win_rate === null ? "–"
        : `${(100 * m.win_rate).toFixed(0)}% (${(100 * m.ci_low).toFixed(0)}–${(100 * m.ci_high).toFixed(0)}%)`);
      body.append(row);
    }
  } catch (err) {
    say("stats-summary", String(err.message || err), true);
  }
}

// start

async function start() {
  $("annotator").textContent = annotatorId();
  for (const tab of document.querySelectorAll("nav button")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); say("chat-status", ""); });
  $("compare-form").addEventListener("submit", compare);
  $("next-prompt").addEventListener("click", nextPrompt);
  for (const b of document.querySelectorAll(".pick")) b.addEventListener("click", () => judge(b.dataset.choice));
  $("stats-refresh").addEventListener("click", loadStats);

  const response = await fetch("/ui/config");
  state.config = await response.json();
  for (const name of state.config.models) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    $("chat-model").append(option);
  }
  $("max-tokens").max = String(state.config.max_tokens);
  $("max-tokens").value = String(state.config.default_max_tokens);
  for (const side of ["A", "B"]) {
    const select = $("rate-" + side);
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "–";
    select.append(none);
    for (let r = 1; r <= state.config.num_bins; r++) {
      const option = document.createElement("option");
      option.value = String(r);
      option.textContent = String(r);
      select.append(option);
    }
  }
  if (!state.config.compare) {
    $("compare-form").hidden = true;
    $("compare-off").hidden = false;
    $("compare-off").textContent = state.config.labels
      ? "Comparing needs two checkpoints: start the server with ckpt_b=<another checkpoint>."
      : "Labelling is off: start the server with feedback_dir=<folder>.";
  }
  if (state.config.queue) {
    $("next-prompt").hidden = false;
    nextPrompt();
  }
  document.body.dataset.ready = "1";
}

start();
