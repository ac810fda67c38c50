/*
 * netsurgery dashboard: one page, no build step, no dependencies.
 *
 * Views (chosen by the URL's hash):
 *   (no key)      the key form; the key is kept in sessionStorage (this tab only)
 *   #/            the job list (refreshed every 2 s) and the form that starts a job
 *   #/jobs/<id>   one job: summary, live charts, per-layer bars, error, artifacts, cancel
 *
 * Everything comes from the /v1 REST API, with "Authorization: Bearer <key>" on every request.
 * While a job is queued or running its page follows GET /v1/jobs/<id>/events (Server-Sent Events,
 * read with fetch so that the key can be sent; resumed with Last-Event-ID after a drop). Where
 * the stream cannot be had (no ReadableStream, a refusal, repeated drops) the page polls instead,
 * every second, GET /v1/jobs/<id> and the new points of /progress and /layers (cursors:
 * ?after=next_after). document.body.dataset.live says which: "sse" or "poll". Charts are SVG drawn here.
 * Server text is only ever put in the page with textContent, never parsed as HTML.
 */
"use strict";

(function () {
  const KEY_STORAGE = "netsurgery.apiKey";
  // the page is served at <root>/dashboard/: API paths are relative to <root>, so a path prefix works
  const ROOT = new URL("..", document.baseURI);
  const POLL_JOB_MS = 1000;
  const POLL_LIST_MS = 2000;
  const PROGRESS_PAGE = 500;
  const LAYERS_PAGE = 100;
  const ACTIVE = new Set(["queued", "running"]);
  const SEARCHING = new Set(["dns", "agp", "han"]); // the methods that search when given only an accuracy budget
  const JOB_HASH = /^#\/jobs\/([0-9a-fA-F-]{36})$/;
  const COMPARE_HASH = /^#\/compare\/([0-9a-fA-F,-]+)$/;
  const MAX_COMPARED = 12;
  const STREAM_RECONNECTS = 3; // drops in a row (no event in between) before the page falls back to polling
  const STREAM_RETRY_MS = 1000;
  const RENDER_MS = 100; // events are drawn at most this often

  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  /** fetch(ROOT + path) with the key; JSON back (or the Response with raw); ApiError on failure. */
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("Authorization", "Bearer " + (apiKey() || ""));
    let body;
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      body = JSON.stringify(options.json);
    }
    let response;
    try {
      response = await fetch(new URL(path, ROOT), {
        method: options.method || "GET",
        headers,
        body,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new ApiError(0, "network", "the service cannot be reached");
    }
    if (!response.ok) {
      let code = "http_" + response.status;
      let detail = response.statusText || code;
      try {
        const err = await response.json();
        code = err.error || code;
        detail = err.detail || detail;
      } catch (e) {
        /* not JSON: keep the status text */
      }
      if (response.status === 401) {
        forgetKey("The API key was not accepted (" + detail + ").");
      }
      throw new ApiError(response.status, code, detail);
    }
    if (options.raw) return response;
    return response.status === 204 ? null : response.json();
  }

  function describe(error) {
    if (error instanceof ApiError) {
      if (error.status === 429) return "rate limited; retrying";
      return error.detail;
    }
    return String(error);
  }

  // -------------------------------------------------------------------------------- formatting

  const intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : intFmt.format(n);
  }

  function fmtNum(n, digits) {
    return n === null || n === undefined ? "–" : Number(n).toFixed(digits);
  }

  function fmtCompression(x) {
    return x === null || x === undefined ? "–" : fmtNum(x, 2) + "×";
  }

  function fmtAccuracy(percent) {
    return percent === null || percent === undefined ? "–" : fmtNum(percent, 2) + " %";
  }

  /** A drop in points, as a change: a drop of 0.24 is "−0.24", a gain "+0.10". */
  function fmtDrop(points) {
    return points === null || points === undefined ? "–" : (points > 0 ? "−" : "+") + Math.abs(points).toFixed(2);
  }

  function fmtBudget(result) {
    if (!result || result.budget_met === null || result.budget_met === undefined) return "–";
    return (result.budget_met ? "met" : "not met") + " (" + result.max_accuracy_drop + " pt)";
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  function fmtDuration(fromIso, toIso) {
    if (!fromIso) return "–";
    const s = Math.max(0, Math.round(((toIso ? new Date(toIso) : new Date()) - new Date(fromIso)) / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function fmtBytes(n) {
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n;
    let i = -1;
    do {
      v /= 1024;
      i += 1;
    } while (v >= 1024 && i < units.length - 1);
    return v.toFixed(v < 10 ? 1 : 0) + " " + units[i];
  }

  function fmtTarget(job) {
    const t = job.target || {};
    const parts = [];
    if (t.compression !== undefined) parts.push(t.compression + "×");
    if (t.layer_kept) parts.push(Object.keys(t.layer_kept).length + " layer fractions");
    if (isSearch(job)) parts.push("the highest compression");
    if (t.max_accuracy_drop !== undefined) parts.push("drop ≤ " + t.max_accuracy_drop + " pt");
    return parts.length ? parts.join(" · ") : "–";
  }

  function fmtIteration(job) {
    return fmtInt(job.iteration) + (job.total_iterations ? " / " + fmtInt(job.total_iterations) : "");
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return "dashboard-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ---------------------------------------------------------------------------------- the DOM

  /** An HTML element: el("td", {class: "num"}, "text", child, …). Strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function setStatus(text, isError) {
    const line = $("#status-line");
    line.textContent = text;
    line.classList.toggle("error", Boolean(isError));
  }

  function showView(id) {
    for (const view of ["key-view", "list-view", "job-view", "compare-view"]) {
      document.getElementById(view).hidden = view !== id;
    }
  }

  // ------------------------------------------------------------------------- views and polling

  let generation = 0; // bumped on every view change: loops and fetches of an older view stop
  let timer = null;

  /** Call fn now and then every ms while the view is the same and fn does not return false. */
  function every(ms, fn) {
    const gen = generation;
    const loop = async () => {
      if (gen !== generation) return;
      let again = true;
      try {
        again = (await fn(gen)) !== false;
      } catch (e) {
        if (gen === generation && apiKey()) setStatus(describe(e), true);
      }
      if (again && gen === generation) timer = setTimeout(loop, ms);
    };
    loop();
  }

  function route() {
    generation += 1;
    clearTimeout(timer);
    stopStream();
    if (!apiKey()) {
      showKeyView();
      return;
    }
    $("#forget-key").hidden = false;
    const match = location.hash.match(JOB_HASH);
    const compare = location.hash.match(COMPARE_HASH);
    if (match) showJob(match[1].toLowerCase());
    else if (compare) showCompare(compare[1].toLowerCase().split(",").filter(Boolean));
    else showList();
  }

  // ------------------------------------------------------------------------------------ the key

  function showKeyView(message) {
    showView("key-view");
    $("#forget-key").hidden = true;
    setStatus("");
    const error = $("#key-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("#key-input").focus();
  }

  function forgetKey(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    generation += 1;
    clearTimeout(timer);
    stopStream();
    showKeyView(message);
  }

  async function submitKey(event) {
    event.preventDefault();
    const input = $("#key-input");
    const key = input.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    const button = $("#key-submit");
    button.disabled = true;
    try {
      await api("v1/jobs?limit=1"); // checks the key (a 401 brings the form back with the reason)
      input.value = "";
      route();
    } catch (e) {
      if (e.status !== 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        showKeyView("Could not check the key: " + describe(e));
      }
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------- the job list

  function showList() {
    showView("list-view");
    loadChoices(generation).catch((e) => setStatus(describe(e), true));
    every(POLL_LIST_MS, refreshJobs);
  }

  const LIST_PAGE = 50;
  const picked = new Set(); // the jobs ticked for comparison, kept across pages and filters

  function syncCompareButton() {
    const button = $("#compare-button");
    button.disabled = picked.size < 2 || picked.size > MAX_COMPARED;
    button.textContent = picked.size ? `Compare ${picked.size}` : "Compare";
  }
  const listQuery = { state: "", method: "", name: "", tag: "", offset: 0 }; // the list's filters and page

  /** Tags typed as "a, b,a": ["a", "b"]. */
  function parseTags(text) {
    return [...new Set(text.split(",").map((t) => t.trim()).filter(Boolean))];
  }

  function tagChips(tags) {
    return el("span", { class: "tags" }, ...(tags || []).map((t) => el("span", { class: "tag" }, t)));
  }

  function listPath() {
    const params = new URLSearchParams({ limit: String(LIST_PAGE), offset: String(listQuery.offset) });
    for (const key of ["state", "method", "name", "tag"]) {
      if (listQuery[key]) params.set(key, listQuery[key]);
    }
    return "v1/jobs?" + params.toString();
  }

  /** A filter changed: back to the first page, and ask at once. */
  function filterChanged() {
    if ($("#list-view").hidden) return; // a late keystroke's timer, after the list was left
    const form = $("#jobs-filter");
    for (const key of ["state", "method", "name", "tag"]) listQuery[key] = form.elements[key].value.trim();
    listQuery.offset = 0;
    generation += 1;
    clearTimeout(timer);
    every(POLL_LIST_MS, refreshJobs);
  }

  function turnPage(step) {
    if ($("#list-view").hidden) return;
    listQuery.offset = Math.max(0, listQuery.offset + step * LIST_PAGE);
    generation += 1;
    clearTimeout(timer);
    every(POLL_LIST_MS, refreshJobs);
  }

  async function refreshJobs(gen) {
    const page = await api(listPath());
    if (gen !== generation) return false;
    if (!page.items.length && page.total > 0 && listQuery.offset > 0) {
      // the page emptied (jobs deleted): go to the last one that has jobs
      listQuery.offset = Math.max(0, Math.floor((page.total - 1) / LIST_PAGE) * LIST_PAGE);
      return true;
    }
    const rows = page.items.map((job) => {
      const link = el("a", { href: "#/jobs/" + job.id, title: job.id }, el("code", {}, job.id.slice(0, 8)));
      const state = el("span", { class: "state", "data-state": job.state }, job.state);
      const cancelling = job.cancel_requested && ACTIVE.has(job.state) ? " · cancelling" : "";
      const pick = el("input", { type: "checkbox", "aria-label": "compare " + (job.name || job.id.slice(0, 8)) });
      pick.checked = picked.has(job.id);
      pick.addEventListener("change", () => {
        if (pick.checked) picked.add(job.id);
        else picked.delete(job.id);
        syncCompareButton();
      });
      return el(
        "tr",
        { "data-job-id": job.id, "data-state": job.state },
        el("td", { "data-field": "pick", class: "pick" }, pick),
        el("td", { "data-field": "id" }, link),
        el("td", { "data-field": "name" }, job.name || ""),
        el("td", { "data-field": "state" }, state, cancelling),
        el("td", { "data-field": "method" }, job.method),
        el("td", { "data-field": "iteration", class: "num" }, fmtIteration(job)),
        el("td", { "data-field": "compression", class: "num" }, fmtCompression(job.compression)),
        el("td", { "data-field": "val_accuracy", class: "num" }, fmtAccuracy(job.val_accuracy)),
        el("td", { "data-field": "val_drop", class: "num" }, fmtDrop(job.result && job.result.val_drop)),
        el("td", { "data-field": "budget_met" }, fmtBudget(job.result)),
        el("td", { "data-field": "tags" }, tagChips(job.tags)),
        el("td", { "data-field": "created" }, fmtTime(job.created_at)),
      );
    });
    const filtered = ["state", "method", "name", "tag"].some((key) => listQuery[key]);
    if (!rows.length) {
      const text = filtered ? "No jobs match these filters." : "No jobs yet: start one with the form.";
      rows.push(el("tr", {}, el("td", { class: "empty", colspan: 12 }, text)));
    }
    $("#jobs-table tbody").replaceChildren(...rows);
    const first = page.items.length ? listQuery.offset + 1 : 0;
    const last = listQuery.offset + page.items.length;
    $("#jobs-total").textContent = `${page.total} ${filtered ? "matching" : "in all"}`;
    $("#page-at").textContent = page.total ? `${first}–${last} of ${page.total}` : "";
    $("#page-prev").disabled = listQuery.offset === 0;
    $("#page-next").disabled = last >= page.total;
    setStatus("updated " + new Date().toLocaleTimeString());
    return true;
  }

  // ------------------------------------------------------------------------------- comparing jobs

  let compared = null; // {ids, jobs: Map(id -> job), progress: Map(id -> points)}

  function showCompare(ids) {
    showView("compare-view");
    const unique = [...new Set(ids)].slice(0, MAX_COMPARED);
    compared = { ids: unique, jobs: new Map(), progress: new Map(), after: new Map() };
    for (const id of unique) {
      compared.progress.set(id, []);
      compared.after.set(id, -1);
    }
    $("#compare-count").textContent = String(unique.length);
    every(POLL_LIST_MS, refreshCompare);
  }

  /** Every job of the comparison with its new progress points; true while one of them is still active. */
  async function refreshCompare(gen) {
    const view = compared;
    for (const id of view.ids) {
      if (view.jobs.has(id) && !ACTIVE.has(view.jobs.get(id).state)) continue; // finished: its history is complete
      let job;
      try {
        job = await api("v1/jobs/" + id);
      } catch (e) {
        if (e.status !== 404) throw e;
        view.jobs.set(id, { id, missing: true, state: "deleted" });
        continue;
      }
      if (gen !== generation) return false;
      for (;;) {
        const page = await api(`v1/jobs/${id}/progress?after=${view.after.get(id)}&limit=${PROGRESS_PAGE}`);
        if (gen !== generation) return false;
        view.progress.get(id).push(...page.items);
        view.after.set(id, page.next_after);
        if (page.items.length < PROGRESS_PAGE) break;
      }
      view.jobs.set(id, job);
    }
    renderCompare(view);
    const active = view.ids.some((id) => ACTIVE.has(view.jobs.get(id).state));
    setStatus((active ? "live; " : "") + "updated " + new Date().toLocaleTimeString());
    return active;
  }

  function jobLabel(job) {
    return job.name ? `${job.name} (${job.id.slice(0, 8)})` : job.id.slice(0, 8);
  }

  function renderCompare(view) {
    const jobs = view.ids.map((id) => view.jobs.get(id)).filter((job) => job && !job.missing);
    $("#compare-table tbody").replaceChildren(
      ...view.ids.map((id, i) => {
        const job = view.jobs.get(id);
        const swatch = el("i", { class: "swatch s" + (i % 6) });
        const link = el("a", { href: "#/jobs/" + id, title: id }, el("code", {}, id.slice(0, 8)));
        if (!job || job.missing) {
          return el("tr", { "data-job-id": id }, el("td", {}, swatch, link), el("td", { colspan: 8 }, "not found"));
        }
        const result = job.result;
        return el(
          "tr",
          { "data-job-id": id, "data-state": job.state },
          el("td", {}, swatch, link),
          el("td", { "data-field": "name" }, job.name || ""),
          el("td", {}, el("span", { class: "state", "data-state": job.state }, job.state)),
          el("td", {}, job.method),
          el("td", {}, fmtTarget(job)),
          el("td", { class: "num", "data-field": "compression" }, fmtCompression(job.compression)),
          el("td", { class: "num", "data-field": "val_accuracy" }, fmtAccuracy(result ? result.val_acc : job.val_accuracy)),
          el("td", { class: "num" }, fmtDrop(result && result.val_drop)),
          el("td", {}, fmtBudget(result)),
        );
      }),
    );
    $("#compare-legend").replaceChildren(
      ...view.ids.map((id, i) => {
        const job = view.jobs.get(id);
        return el("span", {}, el("i", { class: "swatch s" + (i % 6) }), job && !job.missing ? jobLabel(job) : id.slice(0, 8));
      }),
    );
    const series = (field) =>
      view.ids.map((id) => {
        const job = view.jobs.get(id);
        const points = view.progress.get(id).filter((p) => p[field] !== null).map((p) => [p.iteration, p[field]]);
        return { name: job && !job.missing ? jobLabel(job) : id.slice(0, 8), points };
      });
    const xMax = Math.max(0, ...jobs.map((job) => job.total_iterations || job.iteration || 0));
    lineChart($("#compare-compression"), {
      series: series("compression"), xMax, xLabel: "iteration", yLabel: "compression (×)", yMin: 1,
      empty: "no progress recorded yet",
    });
    lineChart($("#compare-accuracy"), {
      series: series("val_accuracy"), xMax, xLabel: "iteration", yLabel: "validation accuracy (%)", clamp: [0, 100],
      empty: "no evaluation recorded yet",
    });
    // one dot per job: what it delivered (its verdict) once it succeeded, else where it stands
    lineChart($("#compare-scatter"), {
      series: view.ids.map((id) => {
        const job = view.jobs.get(id);
        if (!job || job.missing) return { name: id.slice(0, 8), points: [], dotsOnly: true };
        const r = job.result;
        const compression = r && r.compression !== null ? r.compression : job.compression;
        const accuracy = r && r.val_acc !== null ? r.val_acc : job.val_accuracy;
        const points = compression !== null && accuracy !== null ? [[compression, accuracy]] : [];
        return { name: jobLabel(job), points, dotsOnly: true };
      }),
      xMax: Math.max(2, ...jobs.map((job) => (job.result && job.result.compression) || job.compression || 0)),
      xLabel: "compression (×)", yLabel: "validation accuracy (%)", clamp: [0, 100], dots: true,
      empty: "no job has a compression and an accuracy yet",
    });
  }

  // -------------------------------------------------------------------------------- uploads

  /** POST a multipart form with the key, reporting the bytes sent (fetch cannot: XMLHttpRequest does). */
  function sendForm(path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", new URL(path, ROOT));
      xhr.setRequestHeader("Authorization", "Bearer " + (apiKey() || ""));
      xhr.responseType = "json";
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) onProgress(event.loaded, event.total);
      });
      xhr.addEventListener("load", () => {
        const body = xhr.response || {};
        if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, body });
        else {
          if (xhr.status === 401) forgetKey("The API key was not accepted (" + (body.detail || "401") + ").");
          reject(new ApiError(xhr.status, body.error || "http_" + xhr.status, body.detail || xhr.statusText));
        }
      });
      xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the service cannot be reached")));
      xhr.send(form);
    });
  }

  async function upload(kind, event) {
    event.preventDefault();
    const form = event.target;
    const status = $(`#${kind}-upload-status`);
    const bar = $(`#${kind}-progress`);
    const button = $(`#${kind === "model" ? "model-upload" : "data-upload"}`);
    status.classList.remove("error");
    const body = new FormData();
    let path;
    let json = null;
    if (kind === "model") {
      path = "v1/models";
      for (const file of $("#model-files").files) body.append("file", file, file.name);
      for (const key of ["architecture", "name", "config"]) {
        const value = form.elements[key].value.trim();
        if (value) body.append(key, value);
      }
    } else {
      path = "v1/datasets";
      const builtin = $("#data-builtin").value;
      if (builtin) json = { builtin, ...(form.elements.name.value.trim() ? { name: form.elements.name.value.trim() } : {}) };
      else {
        const file = $("#data-file").files[0];
        if (!file) {
          status.textContent = "Choose a file, or a built-in set.";
          status.classList.add("error");
          return;
        }
        body.append("file", file, file.name);
        const targets = $("#data-targets").files[0];
        if (targets) body.append("targets", targets, targets.name);
        if (form.elements.name.value.trim()) body.append("name", form.elements.name.value.trim());
      }
    }
    button.disabled = true;
    bar.hidden = json !== null;
    bar.value = 0;
    status.textContent = json ? "adding…" : "uploading…";
    try {
      let result;
      if (json) result = { status: 201, body: await api(path, { method: "POST", json }) };
      else {
        result = await sendForm(path, body, (sent, total) => {
          bar.value = total ? sent / total : 0;
          status.textContent = `uploading… ${fmtBytes(sent)} of ${fmtBytes(total)}`;
        });
      }
      const item = result.body;
      bar.value = 1;
      status.textContent =
        result.status === 200
          ? `You had uploaded this already: ${item.name} (${item.id.slice(0, 8)}); nothing new was stored.`
          : `Added ${item.name} (${item.id.slice(0, 8)}).`;
      form.reset();
      await loadChoices(generation);
      const select = $(kind === "model" ? "#model-select" : "#dataset-select");
      if ([...select.options].some((o) => o.value === item.id)) select.value = item.id;
    } catch (e) {
      if (e.status !== 401) {
        status.textContent = "Refused: " + describe(e);
        status.classList.add("error");
      }
    } finally {
      button.disabled = false;
      bar.hidden = true;
    }
  }

  // --------------------------------------------------------------------------- the new-job form

  let formKey = randomKey(); // Idempotency-Key of the form as filled in now: a double submit makes one job

  async function loadChoices(gen) {
    const [models, datasets] = await Promise.all([api("v1/models?limit=1000"), api("v1/datasets?limit=1000")]);
    if (gen !== generation) return;
    fillSelect($("#model-select"), models.items, (m) => {
      const kind = m.architecture || m.format;
      return `${m.name} (${kind}, ${fmtInt(m.parameter_count)} parameters)`;
    }, "No models uploaded yet");
    fillSelect($("#dataset-select"), datasets.items, (d) => {
      const kind = d.builtin_name ? "built-in " + d.builtin_name : `${d.kind}, ${fmtInt(d.n_examples)} examples`;
      return `${d.name} (${kind})`;
    }, "No data uploaded yet");
    $("#start-job").disabled = !(models.items.length && datasets.items.length);
  }

  function fillSelect(select, items, label, emptyText) {
    const previous = select.value;
    if (!items.length) {
      select.replaceChildren(el("option", { value: "", disabled: true, selected: true }, emptyText));
      return;
    }
    select.replaceChildren(...items.map((item) => el("option", { value: item.id }, label(item))));
    if (items.some((item) => item.id === previous)) select.value = previous;
  }

  /** The method settings filled in (empty ones are left to their defaults). */
  function formSettings(method) {
    const settings = {};
    for (const field of document.querySelectorAll("#job-settings [data-setting]")) {
      const row = field.closest("[data-for]");
      if (row && row.dataset.for !== method) continue; // a setting of another method
      const text = field.value.trim();
      if (text === "") continue;
      const key = field.dataset.setting;
      const type = field.dataset.type;
      if (type === "int" || type === "float") settings[key] = Number(text);
      else if (type === "list") settings[key] = text.split(",").map((t) => t.trim()).filter(Boolean);
      else if (type === "pairs") {
        const pairs = {};
        for (const item of text.split(",").map((t) => t.trim()).filter(Boolean)) {
          const [layer, value] = item.split("=").map((t) => t.trim());
          if (!layer || value === undefined || value === "" || Number.isNaN(Number(value))) {
            throw new Error(`${field.labels[0].textContent}: expected layer=number, got "${item}"`);
          }
          pairs[layer] = Number(value);
        }
        settings[key] = pairs;
      } else settings[key] = text;
    }
    return settings;
  }

  function syncMethodFields() {
    // dns-fixed-crates is driven by its crates: its target may carry only the accuracy budget; dns, agp
    // and han search for the highest compression within the budget when the compression is left empty
    const method = $("#method-select").value;
    const fixed = method === "dns-fixed-crates";
    for (const row of document.querySelectorAll("#job-settings [data-for]")) row.hidden = row.dataset.for !== method;
    const compression = $("#target-compression");
    compression.disabled = fixed;
    compression.required = !fixed && !SEARCHING.has(method);
    $("#max-accuracy-drop").required = SEARCHING.has(method) && compression.value.trim() === "";
  }

  async function submitJob(event) {
    event.preventDefault();
    const method = $("#method-select").value;
    const body = {
      model_id: $("#model-select").value,
      dataset_id: $("#dataset-select").value,
      method,
      settings: {},
    };
    const target = {};
    const compression = $("#target-compression").value.trim();
    // left empty with a drop given, dns, agp and han search for the highest compression within it
    if (method !== "dns-fixed-crates" && compression !== "") target.compression = Number(compression);
    const drop = $("#max-accuracy-drop").value.trim();
    if (drop !== "") target.max_accuracy_drop = Number(drop);
    if (Object.keys(target).length) body.target = target;
    const iterations = $("#iterations").value.trim();
    if (iterations !== "") body.settings.iterations = Number(iterations);
    try {
      Object.assign(body.settings, formSettings(method));
    } catch (e) {
      const error = $("#form-error");
      error.textContent = "Not started: " + e.message;
      error.hidden = false;
      return;
    }
    const name = $("#job-name-input").value.trim();
    if (name !== "") body.name = name;
    const tags = parseTags($("#job-tags-input").value);
    if (tags.length) body.tags = tags;

    const error = $("#form-error");
    const button = $("#start-job");
    error.hidden = true;
    button.disabled = true;
    try {
      const job = await api("v1/jobs", { method: "POST", json: body, headers: { "Idempotency-Key": formKey } });
      formKey = randomKey();
      location.hash = "#/jobs/" + job.id;
    } catch (e) {
      if (e.status !== 401) {
        error.textContent = "Not started: " + describe(e);
        error.hidden = false;
      }
    } finally {
      button.disabled = false;
    }
  }

  // --------------------------------------------------------------------------------- a job page

  let current = null; // the job page's data: {id, job, progress, progressAfter, layers, layersAfter, artifacts, names}

  function showJob(id) {
    showView("job-view");
    current = {
      id, job: null, progress: [], progressAfter: -1, layers: [], layersAfter: -1, artifacts: null, names: null,
      frontier: null, frontierMark: null, frontierBusy: false,
      logAfter: 0, logLines: 0, logMark: null, logDone: false, logBusy: false,
    };
    $("#frontier-box").hidden = true;
    $("#job-log").replaceChildren();
    $("#report-box").hidden = true;
    $("#report-frame").srcdoc = "";
    $("#log-count").textContent = "";
    $("#job-name").textContent = "";
    $("#job-tags").replaceChildren();
    showLabelsForm(false);
    $("#job-id").textContent = id;
    $("#job-state").textContent = "loading…";
    $("#job-state").removeAttribute("data-state");
    $("#cancel-button").hidden = true;
    $("#job-summary").replaceChildren();
    $("#job-error-box").hidden = true;
    $("#artifacts").replaceChildren();
    $("#artifacts-note").textContent = "";
    renderCharts(current);
    const view = current;
    if (streamSupported()) followStream(view, generation);
    else startPolling(view);
  }

  function startPolling(view) {
    document.body.dataset.live = "poll";
    every(POLL_JOB_MS, (gen) => pollJob(view, gen));
  }

  // ------------------------------------------------------------------------- the event stream

  let streamAbort = null; // aborts the open stream's fetch

  function stopStream() {
    if (streamAbort) streamAbort.abort();
    streamAbort = null;
    delete document.body.dataset.live;
  }

  function streamSupported() {
    return (
      typeof ReadableStream === "function" &&
      typeof TextDecoder === "function" &&
      typeof AbortController === "function" &&
      typeof Response === "function" &&
      "body" in Response.prototype
    );
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /**
   * A Server-Sent Events parser: feed it decoded text, it returns the events completed so far as
   * {event, id, data}. Lines end with CRLF, LF or CR; a blank line ends an event; ':' starts a comment.
   */
  function sseParser() {
    let buffer = "";
    let data = [];
    let event = "";
    let lastId = null; // as in EventSource: the last id seen, carried by later events without one
    let out = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) out.push({ event: event || "message", id: lastId, data: data.join("\n") });
        data = [];
        event = "";
        return;
      }
      if (text[0] === ":") return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && !value.includes("\0")) lastId = value;
    };
    return (chunk) => {
      buffer += chunk;
      const eol = /\r\n|\r|\n/g;
      let start = 0;
      let m;
      while ((m = eol.exec(buffer))) {
        if (m[0] === "\r" && m.index === buffer.length - 1) break; // maybe the first half of a CRLF
        line(buffer.slice(start, m.index));
        start = eol.lastIndex;
      }
      buffer = buffer.slice(start);
      const events = out;
      out = [];
      return events;
    };
  }

  /**
   * Follow the job through its event stream until a terminal state; reconnect with Last-Event-ID
   * after a drop; poll instead when the stream is refused or drops too often.
   */
  async function followStream(view, gen) {
    document.body.dataset.live = "sse";
    let lastId = null;
    let drops = 0;
    while (gen === generation) {
      const controller = new AbortController();
      streamAbort = controller;
      const headers = new Headers({ Authorization: "Bearer " + (apiKey() || ""), Accept: "text/event-stream" });
      if (lastId !== null) headers.set("Last-Event-ID", lastId);
      let response = null;
      try {
        response = await fetch(new URL(`v1/jobs/${view.id}/events`, ROOT), {
          headers,
          cache: "no-store",
          credentials: "omit",
          signal: controller.signal,
        });
      } catch (e) {
        response = null; // network error: retried below
      }
      if (gen !== generation) return;
      if (response && response.status === 204) {
        // nothing after the terminal event that was received
        if (view.job && !ACTIVE.has(view.job.state)) await finishStream(view, gen);
        else break;
        return;
      }
      if (response && response.status === 401) {
        forgetKey("The API key was not accepted.");
        return;
      }
      if (response && response.status === 404) {
        $("#job-state").textContent = "not found";
        $("#job-error").textContent = "job " + view.id + " not found";
        $("#job-error-box").hidden = false;
        setStatus("");
        return;
      }
      if (response && (!response.ok || !response.body)) break; // refused: poll instead
      if (response) {
        let received = false;
        try {
          const reader = response.body.getReader();
          const decoder = new TextDecoder();
          const parse = sseParser();
          for (;;) {
            const { value, done } = await reader.read();
            if (gen !== generation) {
              reader.cancel().catch(() => {});
              return;
            }
            const events = parse(done ? decoder.decode() : decoder.decode(value, { stream: true }));
            for (const ev of events) {
              if (ev.id !== null) lastId = ev.id;
              received = true;
              if (applyEvent(view, ev)) {
                reader.cancel().catch(() => {});
                await finishStream(view, gen);
                return;
              }
            }
            if (events.length) scheduleRender(view, gen);
            if (done) break;
          }
        } catch (e) {
          if (gen !== generation) return; // aborted by a view change
        }
        if (received) drops = 0;
      }
      // the stream ended before the terminal state, or could not be opened: try again, a few times
      drops += 1;
      if (drops > STREAM_RECONNECTS) break;
      setStatus("live stream lost; reconnecting…", true);
      await sleep(STREAM_RETRY_MS * drops);
    }
    if (gen !== generation) return;
    if (streamAbort) streamAbort.abort();
    streamAbort = null;
    startPolling(view);
  }

  /** Take one event into the view; true when it is the terminal state. */
  function applyEvent(view, ev) {
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch (e) {
      return false;
    }
    if (ev.event === "state") {
      view.job = data;
      return !ACTIVE.has(data.state);
    }
    if (ev.event === "progress") {
      view.progress.push(data);
      view.progressAfter = data.iteration;
      const job = view.job;
      if (job) {
        // the summary follows the points between state events
        job.iteration = Math.max(job.iteration || 0, data.iteration);
        for (const key of ["compression", "val_accuracy", "loss"]) if (data[key] !== null) job[key] = data[key];
      }
    } else if (ev.event === "layers") {
      view.layers.push(data);
      view.layersAfter = data.iteration;
      if (view.job) view.job.layers = data;
    }
    return false;
  }

  let renderTimer = null;

  /** Draw the view soon (at most every RENDER_MS), after the names of its inputs are known. */
  function scheduleRender(view, gen) {
    if (renderTimer !== null) return;
    renderTimer = setTimeout(async () => {
      renderTimer = null;
      if (gen !== generation || !view.job) return;
      try {
        if (view.names === null) {
          view.names = await inputNames(view.job);
          if (gen !== generation) return;
        }
        renderJob(view);
        setStatus("live (stream); updated " + new Date().toLocaleTimeString());
      } catch (e) {
        if (gen === generation && apiKey()) setStatus(describe(e), true);
      }
    }, RENDER_MS);
  }

  /** The terminal state arrived (after every point): the artifacts, and the page as polling leaves it. */
  async function finishStream(view, gen) {
    streamAbort = null;
    clearTimeout(renderTimer);
    renderTimer = null;
    try {
      if (view.names === null) {
        view.names = await inputNames(view.job);
        if (gen !== generation) return;
      }
      if (view.artifacts === null) {
        view.artifacts = (await api(`v1/jobs/${view.id}/artifacts`)).items;
        if (gen !== generation) return;
      }
    } catch (e) {
      if (gen === generation && apiKey()) startPolling(view); // polling asks again (its cursors are current)
      return;
    }
    if (gen !== generation) return;
    renderJob(view);
    setStatus("finished; updated " + new Date().toLocaleTimeString());
  }

  async function pollJob(view, gen) {
    let job;
    try {
      job = await api("v1/jobs/" + view.id);
    } catch (e) {
      if (e.status === 404 && gen === generation) {
        $("#job-state").textContent = "not found";
        $("#job-error").textContent = e.detail;
        $("#job-error-box").hidden = false;
        return false;
      }
      throw e;
    }
    if (gen !== generation) return false;
    const finished = !ACTIVE.has(job.state);
    await fetchHistory(view, gen); // after the job: once it is finished, its history is complete
    if (gen !== generation) return false;
    view.job = job;
    if (view.names === null) {
      view.names = await inputNames(job);
      if (gen !== generation) return false;
    }
    if (finished && view.artifacts === null) {
      view.artifacts = (await api(`v1/jobs/${view.id}/artifacts`)).items;
      if (gen !== generation) return false;
    }
    renderJob(view);
    setStatus((finished ? "finished; " : "live; ") + "updated " + new Date().toLocaleTimeString());
    return !finished;
  }

  /** The names of the job's model and data (their ids if they cannot be read, e.g. deleted). */
  async function inputNames(job) {
    const name = async (path, id, label) => {
      try {
        return label(await api(path + id));
      } catch (e) {
        if (e.status !== 404) throw e; // a passing failure: the next poll asks again
        return id;
      }
    };
    const [model, dataset] = await Promise.all([
      name("v1/models/", job.model_id, (m) => `${m.name} (${m.architecture || m.format})`),
      name("v1/datasets/", job.dataset_id, (d) => (d.builtin_name ? `${d.name} (built-in)` : `${d.name} (${d.kind})`)),
    ]);
    return { model, dataset };
  }

  // Every page of one history ("progress" or "layers") after view[<what>After], appended to
  // view[<what>]; false when the shown job changed meanwhile.
  async function fetchPages(view, gen, what, size) {
    const after = `${what}After`;
    for (;;) {
      const page = await api(`v1/jobs/${view.id}/${what}?after=${view[after]}&limit=${size}`);
      if (gen !== generation) return false;
      view[what].push(...page.items);
      view[after] = page.next_after;
      if (page.items.length < size) return true;
    }
  }

  async function fetchHistory(view, gen) {
    if (await fetchPages(view, gen, "progress", PROGRESS_PAGE)) await fetchPages(view, gen, "layers", LAYERS_PAGE);
  }

  function renderJob(view) {
    const job = view.job;
    $("#job-name").textContent = job.name ? "· " + job.name : "";
    $("#job-tags").replaceChildren(...tagChips(job.tags).childNodes);
    const state = $("#job-state");
    state.textContent = job.cancel_requested && ACTIVE.has(job.state) ? job.state + " · cancelling" : job.state;
    state.dataset.state = job.state;

    const cancel = $("#cancel-button");
    cancel.hidden = !ACTIVE.has(job.state);
    if (!cancel.classList.contains("confirm")) {
      cancel.disabled = job.cancel_requested;
      cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel job";
    }

    const fraction = job.total_iterations ? Math.min(1, job.iteration / job.total_iterations) : 0;
    $("#job-progress-bar").style.width = (job.state === "succeeded" ? 100 : fraction * 100).toFixed(1) + "%";

    const fields = [
      ["state", "State", job.state],
      ["method", "Method", job.method],
      ["target", "Target", fmtTarget(job)],
      ["iteration", "Iteration", fmtIteration(job)],
      ["compression", "Compression", fmtCompression(job.compression)],
      ["val_accuracy", "Validation accuracy", fmtAccuracy(job.val_accuracy)],
      ["loss", "Loss", job.loss !== null ? fmtNum(job.loss, 4) : "–"],
      ["attempt", "Attempt", String(job.attempt)],
      ["created", "Created", fmtTime(job.created_at)],
      ["started", "Started", fmtTime(job.started_at)],
      ["finished", "Finished", fmtTime(job.finished_at)],
      ["duration", "Run time", fmtDuration(job.started_at, job.finished_at)],
      ...resultFields(job.result),
      ["model", "Model", view.names ? view.names.model : job.model_id],
      ["dataset", "Data", view.names ? view.names.dataset : job.dataset_id],
    ];
    $("#job-summary").replaceChildren(
      ...fields.map(([key, label, value]) => el("div", { "data-field": key }, el("dt", {}, label), el("dd", {}, value))),
    );

    $("#job-error").textContent = job.error || "";
    $("#job-error-box").hidden = !job.error;

    renderCharts(view);
    renderFrontier(view);
    renderArtifacts(view);
    if (hasFrontier(job)) refreshFrontier(view);
    refreshLog(view);
  }

  /** Fetch the job's new log lines (one request at a time; again when the job moved on meanwhile). */
  async function refreshLog(view) {
    const job = view.job;
    const mark = job.state + ":" + job.iteration + ":" + job.attempt;
    if (view.logBusy || (view.logMark === mark && view.logDone)) return;
    view.logBusy = true;
    try {
      for (;;) {
        const page = await api(`v1/jobs/${view.id}/logs?after=${view.logAfter}&limit=500`);
        if (current !== view) return;
        appendLog(view, page.items);
        view.logAfter = page.next_after;
        if (page.items.length < 500) break;
      }
      view.logMark = mark;
      view.logDone = !ACTIVE.has(job.state);
    } catch (e) {
      /* the next render asks again */
    } finally {
      view.logBusy = false;
    }
    if (current === view && view.job && view.logMark !== `${view.job.state}:${view.job.iteration}:${view.job.attempt}`) {
      refreshLog(view);
    }
  }

  function appendLog(view, lines) {
    const pre = $("#job-log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    for (const line of lines) {
      const when = new Date(line.at).toLocaleTimeString();
      pre.append(
        el(
          "span",
          { class: "lvl-" + line.level, "data-attempt": line.attempt },
          el("span", { class: "when" }, when + " "),
          `${line.level.padEnd(7)} ${line.message}\n`,
        ),
      );
      view.logLines += 1;
    }
    $("#log-count").textContent = view.logLines ? `${fmtInt(view.logLines)} lines` : "no lines yet";
    if (atEnd && lines.length) pre.scrollTop = pre.scrollHeight;
  }

  function showLabelsForm(show) {
    const form = $("#labels-form");
    form.hidden = !show;
    $("#labels-error").hidden = true;
    if (show && current && current.job) {
      $("#labels-name").value = current.job.name || "";
      $("#labels-tags").value = (current.job.tags || []).join(", ");
      $("#labels-name").focus();
    }
  }

  async function saveLabels(event) {
    event.preventDefault();
    const view = current;
    if (!view) return;
    const name = $("#labels-name").value.trim();
    const body = { name: name === "" ? null : name, tags: parseTags($("#labels-tags").value) };
    const button = $("#labels-save");
    button.disabled = true;
    try {
      const job = await api("v1/jobs/" + view.id, { method: "PATCH", json: body });
      if (current !== view) return;
      view.job = Object.assign({}, view.job, { name: job.name, tags: job.tags });
      renderJob(view);
      showLabelsForm(false);
    } catch (e) {
      if (e.status !== 401) {
        $("#labels-error").textContent = "Not saved: " + describe(e);
        $("#labels-error").hidden = false;
      }
    } finally {
      button.disabled = false;
    }
  }

  /** The verdict of a succeeded job, as summary fields. */
  function resultFields(result) {
    if (!result) return [];
    const change = (split) => {
      const ref = result[`reference_${split}_acc`];
      const acc = result[`${split}_acc`];
      if (ref === null || acc === null) return "–";
      return `${fmtAccuracy(ref)} → ${fmtAccuracy(acc)} (${fmtDrop(result[`${split}_drop`])})`;
    };
    const size =
      result.dense_file_bytes && result.sparse_file_bytes
        ? `${fmtBytes(result.dense_file_bytes)} → ${fmtBytes(result.sparse_file_bytes)} (` +
          fmtNum(result.dense_file_bytes / result.sparse_file_bytes, 1) + "× smaller)"
        : "–";
    return [
      ["result_val", "Validation, reference → pruned", change("val")],
      ["result_test", "Test, reference → pruned", change("test")],
      ["budget_met", "Accuracy budget", fmtBudget(result)],
      ["size", "On disk", size],
    ];
  }

  /** A job asked only for an accuracy budget: it searches for the highest compression within it. */
  function isSearch(job) {
    const t = job.target || {};
    return t.compression == null && hasFrontier(job);
  }

  /** A dns, agp or han job with an accuracy budget climbs a ladder of judged compressions: it has a frontier. */
  function hasFrontier(job) {
    const t = job.target || {};
    return t.layer_kept == null && t.max_accuracy_drop != null && SEARCHING.has(job.method);
  }

  /** Fetch the frontier again when the job moved on since the last fetch (one request at a time). */
  async function refreshFrontier(view) {
    const job = view.job;
    const mark = job.state + ":" + job.iteration;
    if (view.frontierBusy || view.frontierMark === mark) return;
    view.frontierBusy = true;
    const gen = generation;
    try {
      const frontier = await api(`v1/jobs/${view.id}/frontier`);
      if (gen !== generation) return;
      view.frontier = frontier;
      view.frontierMark = mark;
      renderFrontier(view);
    } catch (e) {
      if (gen === generation && apiKey()) setStatus(describe(e), true);
    } finally {
      view.frontierBusy = false;
    }
  }

  function renderFrontier(view) {
    const box = $("#frontier-box");
    const f = view.frontier;
    box.hidden = !(view.job && hasFrontier(view.job));
    if (box.hidden) return;
    const points = f ? f.points : [];
    const within = points.filter((p) => p.within_budget).map((p) => [p.compression, p.val_acc]);
    const over = points.filter((p) => !p.within_budget).map((p) => [p.compression, p.val_acc]);
    within.sort((a, b) => a[0] - b[0]);
    const refs = [];
    if (f && f.reference_val_acc !== null) {
      refs.push({ y: f.reference_val_acc, label: "reference " + fmtAccuracy(f.reference_val_acc) });
      refs.push({ y: f.reference_val_acc - f.max_accuracy_drop, label: "budget: −" + f.max_accuracy_drop + " points" });
    }
    lineChart($("#chart-frontier"), {
      series: [
        { name: "within budget", points: within },
        { name: "over budget", points: over, dotsOnly: true },
      ],
      xMax: Math.max(2, ...points.map((p) => p.compression)),
      xLabel: "compression (×)",
      yLabel: "validation accuracy (%)",
      clamp: [0, 100],
      refs,
      dots: true,
      empty: ACTIVE.has(view.job.state) ? "waiting for the first rung to end…" : "no point was judged",
    });
    const chosen = f && f.chosen;
    $("#frontier-now").textContent = chosen ? "best so far " + fmtCompression(chosen.compression) : "";
    $("#frontier-verdict").textContent = (f && f.verdict) || "";
    const candidates = f && f.candidates.length ? f.candidates : [];
    $("#frontier-candidates tbody").replaceChildren(
      ...(candidates.length
        ? candidates.map((c) =>
            el(
              "tr",
              { class: c.chosen ? "chosen" : "" },
              el("td", {}, fmtCompression(c.compression) + (c.chosen ? " (chosen)" : "")),
              el("td", {}, fmtAccuracy(c.val_acc)),
              el("td", {}, fmtAccuracy(c.test_acc)),
              el("td", {}, c.file || "–"),
            ),
          )
        : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "once the job has succeeded"))]),
    );
  }

  function renderCharts(view) {
    const job = view.job;
    const total = job && job.total_iterations ? job.total_iterations : 0;
    const compression = view.progress.filter((p) => p.compression !== null).map((p) => [p.iteration, p.compression]);
    const accuracy = view.progress.filter((p) => p.val_accuracy !== null).map((p) => [p.iteration, p.val_accuracy]);
    const target = job && job.target && job.target.compression ? job.target.compression : null;
    const empty = job && !ACTIVE.has(job.state) ? "no progress was recorded" : "waiting for the first progress points…";

    lineChart($("#chart-compression"), {
      series: [{ name: "compression", points: compression }],
      xMax: total,
      xLabel: "iteration",
      yLabel: "compression (×)",
      yMin: 1,
      refs: target ? [{ y: target, label: "target " + target + "×" }] : [],
      empty,
    });
    const result = job && job.result;
    const accuracyRefs = [];
    if (result && result.reference_val_acc !== null) {
      accuracyRefs.push({ y: result.reference_val_acc, label: "reference " + fmtAccuracy(result.reference_val_acc) });
      if (result.max_accuracy_drop !== null) {
        const floor = result.reference_val_acc - result.max_accuracy_drop;
        accuracyRefs.push({ y: floor, label: "budget " + fmtAccuracy(floor) });
      }
    }
    lineChart($("#chart-accuracy"), {
      series: [{ name: "val_accuracy", points: accuracy }],
      xMax: total,
      xLabel: "iteration",
      yLabel: "validation accuracy (%)",
      clamp: [0, 100],
      refs: accuracyRefs,
      empty,
    });
    const last = (points) => (points.length ? points[points.length - 1][1] : null);
    $("#compression-now").textContent = compression.length ? fmtCompression(last(compression)) : "";
    $("#accuracy-now").textContent = accuracy.length ? fmtAccuracy(last(accuracy)) : "";

    // per-layer: kept fraction over iterations, and the latest kept of total as bars
    const names = [];
    const byLayer = new Map();
    for (const snapshot of view.layers) {
      for (const l of snapshot.layers) {
        if (!byLayer.has(l.layer)) {
          byLayer.set(l.layer, []);
          names.push(l.layer);
        }
        byLayer.get(l.layer).push([snapshot.iteration, l.total ? (100 * l.kept) / l.total : 0]);
      }
    }
    lineChart($("#chart-layer-history"), {
      series: names.map((name) => ({ name, points: byLayer.get(name) })),
      xMax: total,
      xLabel: "iteration",
      yLabel: "kept (%)",
      yMin: 0,
      yMax: 100,
      empty,
    });
    $("#layer-history-legend").replaceChildren(
      ...names.map((name, i) => el("span", {}, el("i", { class: "swatch s" + (i % 6) }), name)),
    );
    const latest = view.layers.length ? view.layers[view.layers.length - 1] : job ? job.layers : null;
    const noLayers = job && !ACTIVE.has(job.state) ? "no per-layer figures were recorded" : "no per-layer figures yet";
    layersChart($("#layers-chart"), latest, noLayers);
    $("#layers-at").textContent = latest ? "at iteration " + fmtInt(latest.iteration) : "";
  }

  // --------------------------------------------------------------------------- cancel, download

  let cancelArmed = null;

  async function clickCancel() {
    const button = $("#cancel-button");
    const view = current;
    if (!view) return;
    if (!cancelArmed) {
      // two clicks: a long job is not lost to a stray one
      button.classList.add("confirm");
      button.textContent = "Click again to cancel";
      cancelArmed = setTimeout(disarmCancel, 4000);
      return;
    }
    disarmCancel();
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      await api(`v1/jobs/${view.id}/cancel`, { method: "POST" });
    } catch (e) {
      setStatus("Cancel failed: " + describe(e), true);
      button.disabled = false;
    }
  }

  function disarmCancel() {
    clearTimeout(cancelArmed);
    cancelArmed = null;
    const button = $("#cancel-button");
    button.classList.remove("confirm");
    button.textContent = "Cancel job";
  }

  function renderArtifacts(view) {
    const list = $("#artifacts");
    const note = $("#artifacts-note");
    if (view.artifacts === null) {
      note.textContent = "The compressed model and the report appear here when the job succeeds.";
      return;
    }
    if (list.childElementCount === view.artifacts.length && view.artifacts.length) return; // already drawn
    note.textContent = view.artifacts.length
      ? "Downloads are fetched with your key, checked against their SHA-256, then saved."
      : "This job produced no artifacts.";
    list.replaceChildren(
      ...view.artifacts.map((art) => {
        const path = `v1/jobs/${view.id}/artifacts/${encodeURIComponent(art.name)}`;
        const status = el("span", { class: "muted small", "data-role": "status" });
        const href = new URL(path, ROOT).href;
        const link = el("a", { href, class: "artifact-link", "data-artifact": art.name }, art.name);
        link.addEventListener("click", (event) => {
          event.preventDefault(); // a plain link cannot send the Authorization header
          download(path, art, status);
        });
        let viewButton = null;
        if (art.name === "report.html") {
          viewButton = el("button", { type: "button", class: "link-button", id: "view-report" }, "View");
          viewButton.addEventListener("click", () => showReport(path, status));
        }
        return el(
          "li",
          { "data-artifact": art.name },
          link,
          viewButton,
          el("span", { class: "muted" }, art.kind),
          el("span", {}, fmtBytes(art.size_bytes)),
          el("code", { title: "sha256 " + art.sha256 }, "sha256 " + art.sha256.slice(0, 12) + "…"),
          status,
        );
      }),
    );
  }

  /** The report, shown in the page: fetched with the key, drawn in a sandboxed frame (no script runs). */
  async function showReport(path, status) {
    const view = current;
    status.textContent = "loading the report…";
    status.classList.remove("error");
    try {
      const response = await api(path, { raw: true });
      const html = await response.text();
      if (current !== view) return;
      $("#report-box").hidden = false; // shown first: a frame filled while hidden is laid out at width 0
      $("#report-frame").srcdoc = html;
      $("#report-box").scrollIntoView({ block: "start" });
      status.textContent = "";
    } catch (e) {
      status.textContent = "could not load the report: " + describe(e);
      status.classList.add("error");
    }
  }

  async function download(path, art, status) {
    status.textContent = "downloading…";
    status.classList.remove("error");
    try {
      const response = await api(path, { raw: true });
      const blob = await response.blob();
      let checked = "";
      if (window.crypto && crypto.subtle) {
        // only in secure contexts (https, localhost); elsewhere the file is saved unchecked
        const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
        const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
        if (hex !== art.sha256) {
          status.textContent = "checksum mismatch: not saved";
          status.classList.add("error");
          return;
        }
        checked = ", sha256 checked";
      }
      const url = URL.createObjectURL(blob);
      const a = el("a", { href: url, download: art.name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      status.textContent = "saved" + checked;
    } catch (e) {
      status.textContent = "download failed: " + describe(e);
      status.classList.add("error");
    }
  }

  // ------------------------------------------------------------------------------------- charts
  // Drawn by plotly.js, served from the plotly package the service installs (/dashboard/plotly.min.js).

  /** The series colours, as the page's style sheet names them (--s0 … --s5). */
  function palette() {
    const style = getComputedStyle(document.documentElement);
    return [0, 1, 2, 3, 4, 5].map((i) => style.getPropertyValue("--s" + i).trim() || "#2360c4");
  }

  const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
  const FONT = { family: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size: 12, color: "#1d232b" };

  function axisRange(spec) {
    const ys = spec.series.flatMap((s) => s.points.map((p) => p[1])).concat((spec.refs || []).map((r) => r.y));
    let lo = spec.yMin !== undefined ? Math.min(spec.yMin, ...ys) : ys.length ? Math.min(...ys) : 0;
    let hi = spec.yMax !== undefined ? Math.max(spec.yMax, ...ys) : ys.length ? Math.max(...ys) : 1;
    const pad = hi > lo ? (hi - lo) * 0.08 : Math.max(Math.abs(hi) * 0.05, 1);
    if (spec.yMin === undefined) lo -= pad;
    if (spec.yMax === undefined) hi += pad;
    if (spec.clamp) {
      lo = Math.max(lo, spec.clamp[0]);
      hi = Math.min(hi, spec.clamp[1]);
      if (!ys.length) [lo, hi] = spec.clamp;
    }
    return hi > lo ? [lo, hi] : [lo, lo + 1];
  }

  /**
   * A line chart of spec.series ({name, points: [[x, y], …], dotsOnly}) with horizontal reference lines
   * (spec.refs: {y, label}); every point is a marker of its own with spec.dots. The plot's traces (the
   * graph div's ``data``) are the series, one per series, in order.
   */
  function lineChart(div, spec) {
    const colours = palette();
    const traces = spec.series.map((series, i) => ({
      type: "scatter",
      mode: series.dotsOnly ? "markers" : spec.dots ? "lines+markers" : "lines",
      name: series.name,
      x: series.points.map((p) => p[0]),
      y: series.points.map((p) => p[1]),
      line: { color: colours[i % 6], width: 2 },
      marker: { color: colours[i % 6], size: spec.dots ? 8 : 5 },
      hovertemplate: `${series.name}<br>%{x:,}: %{y:.2f}<extra></extra>`,
    }));
    const refs = spec.refs || [];
    const points = spec.series.reduce((n, s) => n + s.points.length, 0);
    const range = axisRange(spec);
    // a reference outside the range (a budget floor under 0 %) keeps its label, at the edge it is beyond
    const inside = (y) => y >= range[0] && y <= range[1];
    const edge = (y) => Math.min(Math.max(y, range[0]), range[1]);
    const layout = {
      margin: { l: 58, r: 16, t: 12, b: 44 },
      height: 280,
      font: FONT,
      showlegend: false, // the page draws each chart's legend itself
      xaxis: {
        title: { text: spec.xLabel },
        range: [0, Math.max(spec.xMax || 0, ...spec.series.flatMap((s) => s.points.map((p) => p[0])), 1)],
        zeroline: false,
      },
      yaxis: { title: { text: spec.yLabel }, range, zeroline: false },
      shapes: refs.filter((r) => inside(r.y)).map((r) => ({
        type: "line", xref: "paper", x0: 0, x1: 1, y0: r.y, y1: r.y,
        line: { color: "#7a8594", width: 1, dash: "dash" },
      })),
      annotations: refs
        .map((r) => ({
          xref: "paper", x: 1, xanchor: "right", y: edge(r.y), yanchor: r.y > range[1] ? "top" : "bottom",
          text: inside(r.y) ? r.label : `${r.label} (${r.y < range[0] ? "below" : "above"} the chart)`,
          showarrow: false, font: { size: 11, color: "#5f6b7a" },
        }))
        .concat(points ? [] : [{ xref: "paper", yref: "paper", x: 0.5, y: 0.5, text: spec.empty || "", showarrow: false,
                                 font: { size: 13, color: "#5f6b7a" } }]),
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    Plotly.react(div, traces, layout, PLOT_CONFIG);
  }

  /**
   * Kept weights per layer as horizontal bars, each layer on its own scale: "before" (all its weights, 100%)
   * behind "after" (the share kept). The counts are each bar's customdata: [kept, total].
   */
  function layersChart(div, snapshot, emptyText) {
    const layers = snapshot ? snapshot.layers : [];
    const names = layers.map((l) => l.layer);
    const counts = layers.map((l) => [l.kept, l.total]);
    const share = (l) => (l.total ? (100 * l.kept) / l.total : 0);
    const traces = [
      {
        type: "bar", orientation: "h", name: "before: all weights", y: names, x: layers.map(() => 100),
        customdata: counts, marker: { color: "#dfe4ec" }, hoverinfo: "skip",
        text: layers.map((l) => `${fmtInt(l.kept)} / ${fmtInt(l.total)}`), textposition: "inside",
        insidetextanchor: "end", textfont: { color: "#5f6b7a" },
      },
      {
        type: "bar", orientation: "h", name: "after: kept", y: names, x: layers.map(share), customdata: counts,
        marker: { color: palette()[0] }, text: layers.map((l) => share(l).toFixed(1) + "%"), textposition: "inside",
        insidetextanchor: "start", textfont: { color: "#ffffff" },
        hovertemplate: "%{y}: %{customdata[0]:,} of %{customdata[1]:,} weights kept (%{x:.1f}%)<extra></extra>",
      },
    ];
    const layout = {
      barmode: "overlay",
      margin: { l: 12, r: 16, t: 8, b: 40 },
      height: Math.max(160, 60 + layers.length * 40),
      font: FONT,
      showlegend: false,
      xaxis: { title: { text: "kept (%)" }, range: [0, 100] },
      yaxis: { autorange: "reversed", automargin: true },
      annotations: layers.length ? [] : [{ xref: "paper", yref: "paper", x: 0.5, y: 0.5, text: emptyText,
                                           showarrow: false, font: { size: 13, color: "#5f6b7a" } }],
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    Plotly.react(div, traces, layout, PLOT_CONFIG);
  }

  // -------------------------------------------------------------------------------------- start

  document.addEventListener("DOMContentLoaded", () => {
    $("#key-form").addEventListener("submit", submitKey);
    $("#forget-key").addEventListener("click", () => forgetKey());
    $("#new-job-form").addEventListener("submit", submitJob);
    $("#model-upload-form").addEventListener("submit", (event) => upload("model", event));
    $("#data-upload-form").addEventListener("submit", (event) => upload("data", event));
    $("#new-job-form").addEventListener("input", () => {
      formKey = randomKey(); // a changed request is a new job
    });
    $("#method-select").addEventListener("change", syncMethodFields);
    $("#target-compression").addEventListener("input", syncMethodFields);
    $("#cancel-button").addEventListener("click", clickCancel);
    $("#jobs-filter").addEventListener("submit", (event) => event.preventDefault());
    $("#jobs-filter").addEventListener("change", filterChanged);
    let typing = null;
    $("#jobs-filter").addEventListener("input", (event) => {
      if (event.target.tagName !== "INPUT") return;
      clearTimeout(typing);
      typing = setTimeout(filterChanged, 300);
    });
    $("#page-prev").addEventListener("click", () => turnPage(-1));
    $("#compare-button").addEventListener("click", () => {
      if (picked.size >= 2) location.hash = "#/compare/" + [...picked].join(",");
    });
    $("#page-next").addEventListener("click", () => turnPage(1));
    $("#edit-labels").addEventListener("click", () => showLabelsForm($("#labels-form").hidden));
    $("#labels-cancel").addEventListener("click", () => showLabelsForm(false));
    $("#report-close").addEventListener("click", () => {
      $("#report-box").hidden = true;
      $("#report-frame").srcdoc = "";
    });
    $("#labels-form").addEventListener("submit", saveLabels);
    syncMethodFields();
    window.addEventListener("hashchange", route);
    route();
  });
})();
