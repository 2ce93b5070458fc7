// The web pages' only script: it reads the JSON API (/v1) with the API key kept in this tab's
// session storage (asked for when the service answers 401), and fills the page in.
"use strict";

const KEY = "lorp_api_key";
const FINAL = ["succeeded", "failed", "cancelled"];

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const sent = sessionStorage.getItem(KEY);
  const response = await fetch(path, { ...options, headers: { ...authHeaders(sent), ...(options.headers || {}) } });
  if (response.status === 401) {
    // Forget the key only when it is the one refused: a refresh that left before a key was typed
    // in, and comes back 401 after, must not wipe the new key before the page reloads with it.
    if (sessionStorage.getItem(KEY) === sent) sessionStorage.removeItem(KEY);
    document.getElementById("key-form").hidden = false;
    throw new Error("an API key is required");
  }
  if (!response.ok) {
    const problem = await response.json().catch(() => ({ detail: response.statusText }));
    const field = (problem.errors || []).map((e) => e.field).filter(Boolean)[0];
    throw new Error(`${response.status} ${problem.code || ""}${field ? ` (${field})` : ""}: ${problem.detail}`);
  }
  return response;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function row(cells, attrs = {}) {
  const tr = el("tr", null, attrs);
  for (const cell of cells) tr.append(cell instanceof Node ? wrapCell(cell) : el("td", cell));
  return tr;
}

function wrapCell(node) {
  const td = el("td");
  td.append(node);
  return td;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(digits) : String(value);
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("key").value.trim());
  location.reload();
});

// -- the jobs list and the submit form -------------------------------------------------------------

async function refreshJobs() {
  try {
    const page = await (await api("/v1/jobs?limit=50")).json();
    const body = document.querySelector("#jobs tbody");
    body.replaceChildren(
      ...page.items.map((job) => {
        const link = el("a", job.id.slice(0, 8), { href: `/jobs/${job.id}` });
        const bar = el("progress", null, { max: "1", value: String(job.progress) });
        const status = job.waiting_for ? `${job.status} (waiting for a worker)` : job.status;
        return row([link, status, job.stage || "", bar, job.model, job.method, new Date(job.created_at).toLocaleString()], {
          "data-job": job.id,
          "data-status": job.status,
        });
      })
    );
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// The form's methods come from the service (the engine's registry), never from this page.
async function loadMethods() {
  try {
    const listed = await (await api("/v1/methods")).json();
    const select = document.getElementById("method");
    select.replaceChildren(
      ...listed.methods.map((method) => {
        const option = el("option", method.name, { value: method.name, title: method.label });
        option.selected = method.name === listed.default;
        return option;
      })
    );
    select.dataset.ready = "true";
  } catch (error) {
    showError(error.message);
  }
}

function setUpJobsPage() {
  document.getElementById("submit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (id) => document.getElementById(id).value.trim();
    const body = {
      model: { id: value("model") },
      method: value("method"),
      target: { num_layers: Number(value("num_layers")) },
      calibration: { dataset: value("dataset") || "builtin", num_samples: Number(value("num_samples")), seq_len: Number(value("seq_len")) },
    };
    if (value("heal")) body.options = { heal: value("heal") };
    try {
      const response = await api("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
        body: JSON.stringify(body),
      });
      const job = await response.json();
      location.href = `/jobs/${job.id}`;
    } catch (error) {
      showError(error.message);
    }
  });
  loadMethods();
  refreshJobs();
  setInterval(refreshJobs, 2000);
}

// -- one job ---------------------------------------------------------------------------------------

async function showImage(id, url) {
  const img = document.getElementById(id);
  if (!url) return;
  const blob = await (await api(url)).blob();  // with the key: an <img src> could not send it
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
}

function executionFact(execution) {
  const loads = execution.mode === "sequential" ? `, ${execution.block_loads} block loads` : "";
  const device = execution.device_name ? `${execution.device} (${execution.device_name})` : execution.device;
  const skipped = (execution.skipped || []).map((line) => line.split(":")[0]);
  return `${execution.mode} on ${device}${loads}${skipped.length ? `; skipped ${skipped.join(", ")}` : ""}`;
}

function healFact(heal) {
  if (!heal) return null;
  if (heal.distill) return `${heal.method}: ${heal.distill.reason}`;
  return heal.reason ? `${heal.method} (${heal.reason})` : heal.method;
}

function fillFacts(job) {
  const facts = document.getElementById("facts");
  const summary = job.summary || {};
  const items = [
    ["model", job.model],
    ["method", job.method],
    ["attempts", `${job.attempts} of ${job.max_attempts}`],
    ["RLS / K", summary.rls !== undefined && summary.rls !== null ? `${fmt(summary.rls)} / ${summary.k}` : null],
    ["chosen", summary.chosen_method ? `${summary.chosen_method}: blocks ${JSON.stringify(summary.pruned_layers)} of ${summary.num_blocks}` : null],
    ["execution", summary.execution ? executionFact(summary.execution) : null],
    ["heal", healFact((summary.report || {}).heal)],
  ];
  facts.replaceChildren();
  for (const [name, value] of items) {
    if (value === null || value === undefined) continue;
    facts.append(el("dt", name), el("dd", value, { "data-fact": name }));
  }
}

function fillResults(job) {
  const summary = job.summary || {};
  document.querySelector("#plans tbody").replaceChildren(
    ...(summary.plans || []).map((plan) =>
      row([plan.chosen ? "*" : "", plan.name, JSON.stringify(plan.pruned_layers), fmt(plan.validation_perplexity, 2), fmt(plan.validation_kl, 4)], plan.chosen ? { class: "chosen" } : {})
    )
  );
  const metrics = summary.metrics || {};
  const names = [...new Set(Object.values(metrics).flatMap((m) => Object.keys(m)))].sort();
  document.querySelector("#metrics tbody").replaceChildren(
    ...names.map((name) => row([name, fmt((metrics.dense || {})[name]), fmt((metrics.pruned || {})[name]), fmt((metrics.ratio || {})[name])]))
  );
  const tasks = summary.tasks || [];
  if (tasks.length) {
    const byKey = {};
    for (const t of tasks) (byKey[`${t.task} ${t.metric}`] ||= {})[t.phase] = t.value;
    document.querySelector("#tasks tbody").replaceChildren(
      ...Object.entries(byKey).map(([key, v]) => row([...key.split(" "), fmt(v.dense), fmt(v.pruned)]))
    );
    document.getElementById("tasks").hidden = false;
  }
  const generations = (summary.report || {}).generations || [];
  if (generations.length) {
    document.getElementById("generations").replaceChildren(
      ...generations.flatMap((g) => [el("h3", g.prompt), el("p", "dense"), el("pre", g.dense), el("p", "pruned"), el("pre", g.pruned)])
    );
    document.getElementById("generations-card").hidden = false;
  }
}

async function fillDownloads(job) {
  const artifacts = await (await api(`/v1/jobs/${job.id}/artifacts`)).json();
  document.getElementById("artifacts").replaceChildren(
    ...artifacts.map((a) => {
      const link = el("a", a.name, { href: a.url, download: a.name.split("/").pop(), "data-sha256": a.sha256 });
      if (sessionStorage.getItem(KEY)) {
        link.addEventListener("click", async (event) => {
          // A plain link cannot carry the key: fetch with it, then save what came back.
          event.preventDefault();
          const blob = await (await api(a.url)).blob();
          const save = el("a", null, { href: URL.createObjectURL(blob), download: a.name.split("/").pop() });
          save.click();
        });
      }
      const item = el("li");
      item.append(link, ` ${(a.size_bytes / 1e6).toFixed(2)} MB`);
      return item;
    })
  );
}

async function refreshJob(jobId, timer) {
  try {
    const job = await (await api(`/v1/jobs/${jobId}`)).json();
    document.getElementById("title").textContent = `Job ${job.id}`;
    const status = document.getElementById("status");
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    document.getElementById("stage").textContent = job.stage || "";
    document.getElementById("progress").value = job.progress;
    document.getElementById("percent").textContent = `${Math.round(job.progress * 100)}%`;
    const waiting = document.getElementById("waiting");
    waiting.hidden = !job.waiting_for;
    waiting.textContent = job.waiting_for ? "waiting for a worker: none serves this job's queue" : "";
    const failure = document.getElementById("failure");
    failure.hidden = !job.error;
    const again = job.error && job.error.retryable ? " (the service's condition, not the request: submitting it again may succeed)" : "";
    failure.textContent = job.error ? `${job.error.code}: ${job.error.message}${again}` : "";
    fillFacts(job);
    showError("");
    if (!FINAL.includes(job.status)) return;
    clearInterval(timer.id);
    if (job.status !== "succeeded") return;
    fillResults(job);
    document.getElementById("results").hidden = false;
    await Promise.all([
      showImage("heatmap", job.links.heatmap),
      showImage("plans-chart", job.links.plans_chart),
      showImage("budget-chart", job.links.budget_chart),
      fillDownloads(job),
    ]);
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(error.message);
  }
}

function setUpJobPage() {
  const jobId = location.pathname.split("/").filter(Boolean).pop();
  const timer = {};
  timer.id = setInterval(() => refreshJob(jobId, timer), 1500);
  refreshJob(jobId, timer);
}

if (document.body.dataset.page === "jobs") setUpJobsPage();
else setUpJobPage();
