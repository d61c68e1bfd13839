// cirkit serve's page: pick a reference, describe a change, click a result to refine (the CIR loop).
// Plain DOM, no framework and no build step. Data from the server only ever reaches the page
// through textContent, DOM properties and blob: URLs, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { refId: null, refFile: null, refUrl: null, seq: 0, thumbs: [] };
  let token = sessionStorage.getItem("cirkit-token") || "";

  // -- talking to the server ------------------------------------------------------------------
  async function api(path, options = {}) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const res = await fetch(path, { ...options, headers });
    if (res.status === 401) {
      $("auth").hidden = false;
      $("token").focus();
    }
    return res;
  }

  async function body(res) {
    let data = {};
    try {
      data = await res.json();
    } catch (e) {
      data = {};
    }
    if (!res.ok) throw new Error(data.error || `the server answered ${res.status}`);
    return data;
  }

  function showError(message) {
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  async function loadThumb(img, id, size) {
    const res = await api(`/api/thumb?id=${encodeURIComponent(id)}&size=${size}`);
    if (!res.ok) {
      img.alt = `${id} (no thumbnail)`;
      return;
    }
    const url = URL.createObjectURL(await res.blob());
    state.thumbs.push(url);
    img.src = url;
  }

  async function loadInfo() {
    try {
      const info = await body(await api("/api/info"));
      const m = info.model || {};
      $("info").textContent = `${info.rows.toLocaleString()} images · ${m.backbone} ${m.checkpoint} · ` +
        `${info.search} search · index version ${info.version}`;
      $("k").max = String(info.max_k);
      if (Number($("k").value) > info.max_k) $("k").value = String(info.max_k);
    } catch (e) {
      $("info").textContent = e.message;
    }
  }

  // -- the reference --------------------------------------------------------------------------
  function forgetReference() {
    if (state.refUrl) URL.revokeObjectURL(state.refUrl);
    state.refId = null;
    state.refFile = null;
    state.refUrl = null;
    $("ref-img").hidden = true;
    $("ref-img").removeAttribute("src");
    $("ref-label").textContent = "Drop a reference image here";
    $("clear-ref").hidden = true;
  }

  function useFile(file) {
    forgetReference();
    state.refFile = file;
    state.refUrl = URL.createObjectURL(file);
    $("ref-img").src = state.refUrl;
    $("ref-img").hidden = false;
    $("ref-label").textContent = `Uploaded: ${file.name}`;
    $("clear-ref").hidden = false;
  }

  function useIndexed(id) {
    forgetReference();
    state.refId = id;
    $("ref-img").hidden = false;
    $("ref-img").alt = `reference ${id}`;
    $("ref-label").textContent = `Indexed image: ${id}`;
    $("clear-ref").hidden = false;
    loadThumb($("ref-img"), id, 384);
  }

  // -- the URL holds the query, so a search can be shared and reloaded --------------------------
  function readUrl() {
    const p = new URLSearchParams(location.search);
    const ref = p.get("ref");
    if (ref) useIndexed(ref);
    else forgetReference();
    $("text").value = p.get("text") || "";
    $("text-only-input").value = ref ? "" : p.get("text") || "";
    if (p.get("k")) $("k").value = p.get("k");
    $("where").value = p.get("where") || "";
    $("exclude").checked = p.get("x") === "1";
    return Boolean(ref || p.get("text"));
  }

  function writeUrl(push) {
    const p = new URLSearchParams();
    if (state.refId) p.set("ref", state.refId);
    const text = $("text").value.trim();
    if (text) p.set("text", text);
    p.set("k", $("k").value);
    const where = $("where").value.trim();
    if (where) p.set("where", where);
    if ($("exclude").checked) p.set("x", "1");
    const url = `${location.pathname}?${p}`;
    if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
  }

  // -- searching ------------------------------------------------------------------------------
  async function search(push = true) {
    const text = $("text").value.trim();
    const k = $("k").value;
    const where = $("where").value.trim();
    const exclude = $("exclude").checked;
    if (!state.refId && !state.refFile && !text) {
      showError("Give a reference image, a modification text, or both.");
      return;
    }
    writeUrl(push);
    const seq = ++state.seq;
    showError("");
    $("results").setAttribute("aria-busy", "true");
    const started = performance.now();
    try {
      let res;
      if (state.refFile) {
        const form = new FormData();
        form.append("image", state.refFile);
        if (text) form.append("text", text);
        form.append("k", k);
        if (where) form.append("where", where);
        form.append("exclude_reference", String(exclude));
        res = await api("/api/search", { method: "POST", body: form });
      } else {
        const p = new URLSearchParams({ k });
        if (state.refId) p.set("reference_id", state.refId);
        if (text) p.set("text", text);
        if (where) p.set("where", where);
        if (exclude) p.set("exclude_reference", "true");
        res = await api(`/api/search?${p}`);
      }
      const data = await body(res);
      if (seq === state.seq) render(data, performance.now() - started);
    } catch (e) {
      if (seq === state.seq) showError(e.message);
    } finally {
      if (seq === state.seq) $("results").removeAttribute("aria-busy");
    }
  }

  function render(data, roundTrip) {
    for (const url of state.thumbs) URL.revokeObjectURL(url);
    state.thumbs = [];
    const grid = $("results");
    grid.replaceChildren();
    for (const hit of data.hits) grid.append(hitFigure(hit));
    const t = data.timing_ms || {};
    const ms = (v) => (v === undefined ? "?" : `${Number(v).toFixed(1)} ms`);
    $("timing").textContent = `${data.hits.length} results · ${data.query.kind} query · ` +
      `embedding ${ms(t.embedding)} · search ${ms(t.search)} · decode ${ms(t.decode)} · ` +
      `batch of ${data.batch} · server ${ms(t.total)} · round trip ${ms(roundTrip)} · index version ${data.version}`;
    if (!data.hits.length) showError("No results (is the filter too narrow?).");
  }

  function hitFigure(hit) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.tabIndex = 0;
    fig.title = "Use as the new reference";
    fig.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.id;
    img.loading = "lazy";
    loadThumb(img, hit.id, 256);
    const cap = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${Number(hit.score).toFixed(3)}`;
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    id.title = hit.id;
    cap.append(score, id);
    for (const [key, value] of Object.entries(hit.metadata || {})) {
      if (value === null || value === undefined) continue;
      const line = document.createElement("div");
      line.className = "meta";
      line.textContent = `${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`;
      cap.append(line);
    }
    fig.append(img, cap);
    const pick = () => refine(hit.id);
    fig.addEventListener("click", pick);
    fig.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        pick();
      }
    });
    return fig;
  }

  // The CIR loop: the clicked result becomes the reference; its neighbours show while the
  // next modification is typed.
  function refine(id) {
    useIndexed(id);
    $("text").value = "";
    $("text-only-input").value = "";
    $("text").focus();
    search(true);
  }

  // -- wiring ---------------------------------------------------------------------------------
  function wire() {
    $("file").addEventListener("change", (e) => {
      const file = e.target.files && e.target.files[0];
      if (file) {
        useFile(file);
        search(true);
      }
      e.target.value = "";
    });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) {
        useFile(file);
        search(true);
      }
    });
    $("clear-ref").addEventListener("click", () => {
      forgetReference();
      writeUrl(true);
    });
    $("composed").addEventListener("submit", (e) => {
      e.preventDefault();
      search(true);
    });
    $("text-only").addEventListener("submit", (e) => {
      e.preventDefault();
      forgetReference();
      $("text").value = $("text-only-input").value;
      search(true);
    });
    $("auth").addEventListener("submit", (e) => {
      e.preventDefault();
      token = $("token").value.trim();
      sessionStorage.setItem("cirkit-token", token);
      $("auth").hidden = true;
      loadInfo();
      if (state.refId || state.refFile || $("text").value.trim()) search(false);
    });
    window.addEventListener("popstate", () => {
      if (readUrl()) search(false);
    });
  }

  wire();
  loadInfo();
  if (readUrl()) search(false);
})();
