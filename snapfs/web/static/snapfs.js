/* snapfs recovery panel: actions with a confirmation, live progress over Server-Sent Events,
   notifications, and fragments refreshed from the server after a change. No build step, no
   framework, no inline code (the CSP forbids it). Safe to include on a host app's page: it only
   touches the elements it knows (the banner, the panel's sections). */
(function () {
  "use strict";

  function meta(name) {
    var m = document.querySelector('meta[name="' + name + '"]');
    return m ? m.getAttribute("content") : null;
  }

  var csrf = meta("snapfs-csrf") || "";
  var eventsUrl = meta("snapfs-events");
  if (!eventsUrl) {
    var banner = document.querySelector("[data-snapfs-events]");
    if (banner) eventsUrl = banner.getAttribute("data-snapfs-events");
  }
  var jobsBox = document.getElementById("snapfs-jobs");
  var notifyBox = document.getElementById("snapfs-notify");
  var dialog = document.getElementById("snapfs-confirm");
  var live = document.getElementById("snapfs-live");
  var seen = new Map(); // job id -> last status this page saw
  var mine = new Set(); // jobs started from this page
  var told = new Set(); // jobs whose ending was notified

  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function api(method, url, body) {
    var init = {
      method: method,
      credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRF-Token": csrf }
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (res) {
      return res.json().catch(function () { return null; }).then(function (data) {
        if (!res.ok) throw new Error((data && data.error) || "The server answered " + res.status + ".");
        return data;
      });
    });
  }

  // ---- notifications -------------------------------------------------------------------------
  function notify(kind, text) {
    if (!notifyBox) return;
    var box = el("div", { "class": "toast toast-" + kind, "role": kind === "error" ? "alert" : "status" });
    var close = el("button", { "type": "button", "class": "toast-close", "aria-label": "Dismiss" }, "×");
    close.addEventListener("click", function () { box.remove(); });
    box.append(el("span", { "class": "toast-icon", "aria-hidden": "true" }, kind === "ok" ? "✓" : "!"),
      el("p", {}, text), close);
    notifyBox.append(box);
  }

  // ---- the confirmation dialog ----------------------------------------------------------------
  function renderPreview(p) {
    var frag = document.createDocumentFragment();
    frag.append(el("p", { "class": "summary" }, p.summary));
    var names = { "delete": "Will be deleted", "revert": "Will be put back as they were", "restore": "Will be brought back" };
    ["delete", "revert", "restore"].forEach(function (k) {
      var items = p.changes[k] || [];
      if (!items.length) return;
      var ul = el("ul", { "class": "paths paths-" + k });
      items.forEach(function (path) { ul.append(el("li", {}, path)); });
      if (p.counts[k] > items.length) ul.append(el("li", { "class": "muted" }, "… and " + (p.counts[k] - items.length) + " more"));
      frag.append(el("h3", {}, names[k] + " (" + p.counts[k] + ")"), ul);
    });
    if (p.total) frag.append(el("p", { "class": "kept" }, p.kept));
    return frag;
  }

  function loadPreview(url, box) {
    box.replaceChildren(el("p", { "class": "muted" }, "Working out what would change…"));
    return api("GET", url).then(function (p) {
      box.replaceChildren(renderPreview(p));
    }, function (e) {
      box.replaceChildren(el("p", { "class": "error" }, e.message));
    });
  }

  function confirmAction(src) {
    return new Promise(function (resolve) {
      var text = src.getAttribute("data-confirm");
      if (!text || !dialog || typeof dialog.showModal !== "function") {
        resolve(!text || window.confirm(text));
        return;
      }
      var title = src.getAttribute("data-title") || "Are you sure?";
      dialog.querySelector("#snapfs-confirm-title").textContent = title + "?";
      dialog.querySelector("#snapfs-confirm-text").textContent = text;
      var ok = dialog.querySelector("#snapfs-confirm-ok");
      ok.textContent = title;
      ok.classList.toggle("danger", src.hasAttribute("data-danger"));
      ok.classList.toggle("primary", !src.hasAttribute("data-danger"));
      var box = dialog.querySelector("#snapfs-confirm-preview");
      box.replaceChildren();
      if (src.getAttribute("data-preview")) loadPreview(src.getAttribute("data-preview"), box);
      dialog.returnValue = "";
      dialog.addEventListener("close", function () {
        resolve(dialog.returnValue === "ok");
        if (document.contains(src)) src.focus();
      }, { once: true });
      dialog.showModal();
    });
  }

  // ---- actions --------------------------------------------------------------------------------
  function start(src, url, body) {
    src.setAttribute("aria-busy", "true");
    return api("POST", url, body).then(function (r) {
      mine.add(r.job.id);
      track(r.job);
    }, function (e) {
      notify("error", e.message);
    }).finally(function () { src.removeAttribute("aria-busy"); });
  }

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("button[data-action]") : null;
    if (!btn || btn.form && btn.form.hasAttribute("data-action")) return;
    ev.preventDefault();
    if (btn.getAttribute("aria-busy") === "true") return;
    confirmAction(btn).then(function (yes) {
      if (!yes) return;
      var body = {};
      try { body = JSON.parse(btn.getAttribute("data-body") || "{}"); } catch (e) { body = {}; }
      start(btn, btn.getAttribute("data-action"), body);
    });
  });

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.hasAttribute || !form.hasAttribute("data-action")) return;
    ev.preventDefault();
    var body = {};
    new FormData(form).forEach(function (v, k) { body[k] = String(v); });
    start(form, form.getAttribute("data-action"), body).then(function () { form.reset(); });
  });

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("button[data-preview-url]") : null;
    if (!btn) return;
    var box = document.getElementById(btn.getAttribute("data-preview-target"));
    if (!box) return;
    var open = btn.getAttribute("aria-expanded") === "true";
    btn.setAttribute("aria-expanded", String(!open));
    box.hidden = open;
    if (!open) loadPreview(btn.getAttribute("data-preview-url"), box);
  });

  // ---- jobs and their progress ----------------------------------------------------------------
  function card(job) {
    var id = "job-" + job.id;
    var node = document.getElementById(id);
    if (node || !jobsBox) return node;
    node = el("section", { "class": "job", "id": id, "aria-labelledby": id + "-t" },
      el("h3", { "id": id + "-t" }, job.title),
      el("div", { "class": "bar" },
        el("progress", { "max": "100", "aria-labelledby": id + "-t" }),
        el("span", { "class": "pct" })),
      el("p", { "class": "msg" }),
      el("details", {}, el("summary", {}, "Show details"), el("ol", { "class": "log" })));
    jobsBox.querySelector(".jobs").prepend(node);
    jobsBox.hidden = false;
    return node;
  }

  function render(job) {
    var node = card(job);
    if (!node) return;
    var bar = node.querySelector("progress");
    var pct = node.querySelector(".pct");
    if (job.percent === null || job.percent === undefined) {
      bar.removeAttribute("value");
      pct.textContent = "";
    } else {
      bar.value = job.percent;
      pct.textContent = Math.floor(job.percent) + "%";
    }
    node.setAttribute("data-status", job.status);
    node.querySelector(".msg").textContent = job.message || "";
    var log = node.querySelector(".log");
    log.replaceChildren.apply(log, (job.log || []).map(function (m) { return el("li", {}, m); }));
  }

  function track(job) {
    var before = seen.get(job.id);
    seen.set(job.id, job.status);
    if (job.status === "running" || before !== undefined || mine.has(job.id)) render(job);
    if (job.status !== "running" && !told.has(job.id) && (before === "running" || mine.has(job.id))) {
      told.add(job.id);
      if (job.status === "done") notify("ok", job.message || job.title + ": done.");
      else notify("error", job.title + " failed. " + (job.message || ""));
      refresh();
    }
  }

  // ---- fragments ------------------------------------------------------------------------------
  var refreshing = null;
  function refresh() {
    if (refreshing) return refreshing;
    var nodes = Array.prototype.slice.call(document.querySelectorAll("[data-fragment]"));
    refreshing = Promise.all(nodes.map(function (node) {
      return fetch(node.getAttribute("data-fragment"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (res) { return res.ok ? res.text() : null; })
        .then(function (html) {
          if (html === null) return;
          var tpl = document.createElement("template");
          tpl.innerHTML = html.trim();
          var fresh = tpl.content.querySelector("#" + node.id) || tpl.content.firstElementChild;
          if (!fresh) return;
          var focused = document.activeElement && node.contains(document.activeElement) ? document.activeElement.id : null;
          node.querySelectorAll("details[open][id]").forEach(function (d) {
            var twin = fresh.querySelector("#" + CSS.escape(d.id));
            if (twin) twin.open = true;
          });
          node.replaceWith(fresh);
          if (focused) {
            var again = document.getElementById(focused);
            if (again) again.focus();
          }
        })
        .catch(function () { /* the next change refreshes it */ });
    })).finally(function () { refreshing = null; });
    return refreshing;
  }

  function downloads(data) {
    var keys = new Set();
    var changed = false;
    Object.keys(data.projects || {}).forEach(function (pid) {
      data.projects[pid].forEach(function (d) {
        keys.add(d.key);
        var li = document.querySelector('[data-download-key="' + d.key + '"]');
        if (!li) { changed = true; return; }
        var bar = li.querySelector("progress");
        if (bar && d.percent !== null) bar.value = d.percent;
      });
    });
    document.querySelectorAll("[data-download-key]").forEach(function (li) {
      if (!keys.has(li.getAttribute("data-download-key"))) changed = true;
    });
    if (changed) refresh();
  }

  // ---- the event stream -----------------------------------------------------------------------
  if (eventsUrl && window.EventSource) {
    var source = new EventSource(eventsUrl);
    source.addEventListener("hello", function (e) {
      var d = JSON.parse(e.data);
      (d.jobs || []).forEach(function (j) {
        if (j.status === "running" || seen.has(j.id) || mine.has(j.id)) track(j);
      });
      if (d.reset) refresh();
    });
    source.addEventListener("job", function (e) { track(JSON.parse(e.data)); });
    source.addEventListener("downloads", function (e) { downloads(JSON.parse(e.data)); });
    source.addEventListener("open", function () { if (live) live.textContent = ""; });
    source.addEventListener("error", function () {
      if (live) live.textContent = "Live updates paused; reconnecting…";
    });
  }
}());
