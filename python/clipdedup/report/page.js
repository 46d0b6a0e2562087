// The review page: renders the report's groups one page at a time from the JSON embedded in
// index.html, and keeps the user's decisions (kept file, "do not move", skipped group) in
// localStorage under the report's id. Export writes decisions.json for `clip-image-deduper apply`.
// `planOf` is report/apply.py's plan_group in JavaScript: what the page shows is what apply moves.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("clipdedup-data").textContent);
  var KEY = "clipdedup-decisions:" + DATA.report_id;
  var PER_PAGE = DATA.per_page || 50;
  var FORMAT = "clipdedup-decisions";
  var byId = {};
  DATA.groups.forEach(function (g, k) { byId[g.id] = k; });
  var decisions = loadDecisions();
  var view = [];
  var page = 0;
  var focus = { g: 0, m: 0 };
  var broken = 0;

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text != null) e.textContent = text;
    return e;
  }

  function loadDecisions() {
    try {
      var v = JSON.parse(window.localStorage.getItem(KEY) || "{}");
      return clean(v && typeof v === "object" ? v : {}).groups;
    } catch (e) {
      return {};
    }
  }

  function save() {
    try {
      window.localStorage.setItem(KEY, JSON.stringify(decisions));
    } catch (e) {
      say("could not save the decisions in this browser (" + e.name + "); export them to keep them");
    }
    $("count").textContent = Object.keys(decisions).length + " groups with decisions";
  }

  // Only decisions that name this report's groups and files; returns {groups, dropped}.
  function clean(groups) {
    var out = {}, dropped = 0;
    Object.keys(groups).forEach(function (id) {
      var d = groups[id], k = byId[id];
      if (k === undefined || !d || typeof d !== "object") { dropped++; return; }
      var paths = DATA.groups[k].members.map(function (m) { return m.p; });
      var n = {};
      if (typeof d.kept === "string" && paths.indexOf(d.kept) >= 0) n.kept = d.kept;
      var stay = (Array.isArray(d.stay) ? d.stay : []).filter(function (p) { return paths.indexOf(p) >= 0; });
      if (stay.length) n.stay = stay;
      if (d.skip === true) n.skip = true;
      if (Object.keys(n).length) out[id] = n; else dropped++;
    });
    return { groups: out, dropped: dropped };
  }

  function setDecision(g, d) {
    if (d.kept === g.kept) delete d.kept;
    if (d.stay) {
      d.stay = d.stay.filter(function (p) { return p !== (d.kept || g.kept); });
      if (!d.stay.length) delete d.stay;
    }
    if (!d.skip) delete d.skip;
    if (Object.keys(d).length) decisions[g.id] = d; else delete decisions[g.id];
    save();
    renderGroup(g);
  }

  function decisionOf(g) {
    var d = decisions[g.id] || {};
    return { kept: d.kept, stay: (d.stay || []).slice(), skip: !!d.skip };
  }

  // Per member: "base" (import run, never moved), "kept", "stay" (do not move), "skip", "move".
  function planOf(g) {
    var d = decisionOf(g);
    var kept = d.kept != null ? d.kept : g.kept;
    return g.members.map(function (m) {
      if (m.p === kept) return "kept";
      if (m.b) return "base";
      if (d.skip) return "skip";
      if (d.stay.indexOf(m.p) >= 0) return "stay";
      return "move";
    });
  }

  var LABEL = {
    base: "base file (never moved)", kept: "KEPT", stay: "do not move", skip: "stays (group skipped)",
    move: "will move"
  };

  function keep(g, m) {
    if (!DATA.applicable) return;
    var d = decisionOf(g);
    d.kept = m.p;
    setDecision(g, d);
  }

  function toggleStay(g, m) {
    if (!DATA.applicable || m.b) return;
    var d = decisionOf(g), i = d.stay.indexOf(m.p);
    if (i >= 0) d.stay.splice(i, 1); else d.stay.push(m.p);
    setDecision(g, d);
  }

  function toggleSkip(g) {
    if (!DATA.applicable) return;
    var d = decisionOf(g);
    d.skip = !d.skip;
    setDecision(g, d);
  }

  // Distance from member k to the group's kept file under the plan; null if not within the threshold.
  function toKept(g, k) {
    var d = decisions[g.id], kept = d && d.kept != null ? d.kept : g.kept, best = null;
    g.pairs.forEach(function (p) {
      var other = p[0] === k ? p[1] : p[1] === k ? p[0] : -1;
      if (other >= 0 && g.members[other].p === kept) best = p[2];
    });
    return best;
  }

  function dist(d) { return d == null ? "\u2013" : d.toFixed(4); }

  function memberNode(g, m, state, k) {
    var fig = el("figure", { "class": state, "data-path": m.p, "data-state": state, "data-member": k });
    if (m.t) {
      var img = el("img", { src: m.t, alt: m.s || m.p, loading: "lazy", title: "click: keep this file" });
      fig.appendChild(img);
    } else {
      fig.appendChild(el("div", { "class": "noprev", title: "click: keep this file" }, "no preview"));
    }
    fig.firstChild.addEventListener("click", function () { keep(g, m); });
    var cap = el("figcaption");
    cap.appendChild(el("span", { "class": "badge" }, LABEL[state]));
    cap.appendChild(el("div", { "class": "path" }, m.s || m.p));
    if (state === "move" && m.dest) cap.appendChild(el("div", null, "\u2192 " + m.dest));
    var facts = [m.z != null ? m.z.toLocaleString("en") + " bytes" : "size unknown"];
    if (state !== "kept") facts.push("to kept " + dist(toKept(g, k)));
    facts.push("nearest " + dist(m.n));
    cap.appendChild(el("div", null, facts.join(", ")));
    if (m.x) cap.appendChild(el("div", null, "byte-identical to " + m.x));
    if (m.note) cap.appendChild(el("div", { "class": "note" }, "report: " + m.note));
    var tools = el("div", { "class": "tools" });
    if (m.u) tools.appendChild(el("a", { href: m.u, target: "_blank" }, "open"));
    if (DATA.applicable) {
      var kb = el("button", { type: "button", "class": "keep" }, "keep this");
      kb.addEventListener("click", function () { keep(g, m); });
      tools.appendChild(kb);
    }
    if (DATA.applicable && !m.b) {
      var sb = el("button", { type: "button", "class": "stay" }, state === "stay" ? "move it" : "do not move");
      sb.disabled = state === "kept" || state === "skip";
      sb.addEventListener("click", function () { toggleStay(g, m); });
      tools.appendChild(sb);
    }
    cap.appendChild(tools);
    fig.appendChild(cap);
    return fig;
  }

  function groupNode(g) {
    var sec = el("section", { "class": "group", id: "g" + g.id, "data-group": g.id });
    fillGroup(sec, g);
    return sec;
  }

  function fillGroup(sec, g) {
    sec.textContent = "";
    var d = decisions[g.id];
    sec.classList.toggle("decided", !!d);
    sec.classList.toggle("skipped", !!(d && d.skip));
    var h = el("h2", null, "Group " + g.id + " \u00b7 " + g.members.length + " files");
    if (g.exact) h.appendChild(el("span", { "class": "exact" }, "exact copies"));
    if (d) h.appendChild(el("span", { "class": "mine" }, "your decision"));
    if (DATA.applicable) {
      var skip = el("button", { type: "button", "class": "skip" }, d && d.skip ? "unskip group" : "skip group");
      skip.addEventListener("click", function () { toggleSkip(g); });
      var reset = el("button", { type: "button", "class": "reset" }, "reset");
      reset.disabled = !d;
      reset.addEventListener("click", function () { setDecision(g, {}); });
      h.appendChild(skip);
      h.appendChild(reset);
    }
    sec.appendChild(h);
    var box = el("div", { "class": "members" });
    planOf(g).forEach(function (state, k) { box.appendChild(memberNode(g, g.members[k], state, k)); });
    sec.appendChild(box);
    sec.appendChild(el("p", { "class": "why" }, "the tool keeps " + g.kept + ": " + g.why));
    (g.stayed || []).forEach(function (st) {
      sec.appendChild(el("p", { "class": "note" }, "stays " + st.p + ": " + st.why));
    });
    if (g.pairs.length) {
      var det = el("details");
      det.appendChild(el("summary", null, g.pairs.length + " pairs within the threshold"));
      var tab = el("table");
      g.pairs.forEach(function (p) {
        var tr = el("tr"), a = g.members[p[0]], b = g.members[p[1]];
        tr.appendChild(el("td", null, a.s || a.p));
        tr.appendChild(el("td", null, b.s || b.p));
        tr.appendChild(el("td", null, p[2].toFixed(6)));
        if (p.length > 3) tr.appendChild(el("td", null, "check score " + p[3].toFixed(4)));
        tab.appendChild(tr);
      });
      det.appendChild(tab);
      sec.appendChild(det);
    }
    markFocus();
  }

  function renderGroup(g) {
    var sec = $("g" + g.id);
    if (sec) fillGroup(sec, g);
  }

  function applyFilters() {
    var which = $("f-decided").value, exact = $("f-exact").checked;
    var lo = parseFloat($("f-min").value), hi = parseFloat($("f-max").value);
    view = [];
    DATA.groups.forEach(function (g, k) {
      var decided = !!decisions[g.id];
      if ((which === "decided" && !decided) || (which === "undecided" && decided)) return;
      if (exact && !g.exact) return;
      if (!isNaN(lo) && !(g.dmax >= lo)) return;
      if (!isNaN(hi) && !(g.dmax <= hi)) return;
      view.push(k);
    });
    page = 0;
    focus = { g: 0, m: 0 };
    render();
  }

  function pages() { return Math.max(1, Math.ceil(view.length / PER_PAGE)); }

  function render() {
    var main = $("groups");
    main.textContent = "";
    var first = page * PER_PAGE, chunk = view.slice(first, first + PER_PAGE);
    chunk.forEach(function (k) { main.appendChild(groupNode(DATA.groups[k])); });
    if (!chunk.length) main.appendChild(el("p", null, DATA.groups.length ? "No group matches the filters." : "No duplicate groups."));
    var text = view.length ? "groups " + (first + 1) + "\u2013" + (first + chunk.length) + " of " + view.length : "0 groups";
    $("where").textContent = text + " (" + DATA.groups.length + " in the report), page " + (page + 1) + " of " + pages();
    $("prev").disabled = page === 0;
    $("next").disabled = page + 1 >= pages();
    markFocus();
  }

  function goPage(p) {
    page = Math.min(Math.max(0, p), pages() - 1);
    focus = { g: 0, m: 0 };
    render();
    window.scrollTo(0, 0);
  }

  function focusedGroup() {
    var k = view[page * PER_PAGE + focus.g];
    return k === undefined ? null : DATA.groups[k];
  }

  function markFocus() {
    var old = document.querySelectorAll(".focus");
    for (var i = 0; i < old.length; i++) old[i].classList.remove("focus");
    var g = focusedGroup();
    if (!g) return;
    var sec = $("g" + g.id);
    if (!sec) return;
    sec.classList.add("focus");
    var fig = sec.querySelector('figure[data-member="' + focus.m + '"]');
    if (fig) fig.classList.add("focus");
  }

  function moveFocus(step) {
    var idx = page * PER_PAGE + focus.g + step;
    if (idx < 0 || idx >= view.length) return;
    var p = Math.floor(idx / PER_PAGE);
    focus = { g: idx - p * PER_PAGE, m: 0 };
    if (p !== page) { page = p; render(); } else markFocus();
    var g = focusedGroup();
    if (g && $("g" + g.id)) $("g" + g.id).scrollIntoView({ block: "nearest" });
  }

  function onKey(e) {
    var t = e.target && e.target.tagName;
    if (t === "INPUT" || t === "SELECT" || t === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
    var g = focusedGroup(), handled = true;
    if (e.key === "j" || e.key === "ArrowDown") moveFocus(1);
    else if (e.key === "k" || e.key === "ArrowUp") moveFocus(-1);
    else if (e.key === "l" || e.key === "ArrowRight") { if (g) focus.m = Math.min(focus.m + 1, g.members.length - 1); markFocus(); }
    else if (e.key === "h" || e.key === "ArrowLeft") { focus.m = Math.max(focus.m - 1, 0); markFocus(); }
    else if ((e.key === "Enter" || e.key === "x") && g) keep(g, g.members[focus.m]);
    else if (/^[1-9]$/.test(e.key) && g && +e.key <= g.members.length) { focus.m = +e.key - 1; keep(g, g.members[focus.m]); }
    else if (e.key === "m" && g) toggleStay(g, g.members[focus.m]);
    else if (e.key === "s" && g) toggleSkip(g);
    else if (e.key === "u" && g && DATA.applicable) setDecision(g, {});
    else if (e.key === "n" || e.key === "PageDown") goPage(page + 1);
    else if (e.key === "p" || e.key === "PageUp") goPage(page - 1);
    else handled = false;
    if (handled) e.preventDefault();
  }

  function say(text) { $("message").textContent = text; }

  function exportDecisions() {
    var doc = {
      format: FORMAT, version: 1, report_id: DATA.report_id, image_dir: DATA.image_dir,
      exported: new Date().toISOString(), groups: decisions
    };
    var blob = new Blob([JSON.stringify(doc, null, 1) + "\n"], { type: "application/json" });
    var a = el("a", { href: URL.createObjectURL(blob), download: "decisions.json" });
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    say("exported " + Object.keys(decisions).length + " group decisions as decisions.json");
  }

  function importDecisions(file) {
    var r = new FileReader();
    r.onload = function () {
      var doc;
      try { doc = JSON.parse(r.result); } catch (e) { say(file.name + ": not JSON"); return; }
      if (!doc || doc.format !== FORMAT) { say(file.name + ": not a decisions file"); return; }
      if (doc.report_id !== DATA.report_id) {
        say(file.name + ": decisions for report " + doc.report_id + ", this is report " + DATA.report_id);
        return;
      }
      var c = clean(doc.groups || {});
      decisions = c.groups;
      save();
      applyFilters();
      say("imported " + Object.keys(decisions).length + " group decisions" + (c.dropped ? ", dropped " + c.dropped + " that do not fit this report" : ""));
    };
    r.readAsText(file);
  }

  document.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t.tagName === "IMG") {
      broken++;
      t.classList.add("broken");
      document.body.setAttribute("data-broken", String(broken));
      console.error("thumbnail failed to load: " + t.getAttribute("src"));
    }
  }, true);

  $("f-decided").addEventListener("change", applyFilters);
  $("f-exact").addEventListener("change", applyFilters);
  $("f-min").addEventListener("change", applyFilters);
  $("f-max").addEventListener("change", applyFilters);
  $("prev").addEventListener("click", function () { goPage(page - 1); });
  $("next").addEventListener("click", function () { goPage(page + 1); });
  $("export").addEventListener("click", exportDecisions);
  $("import").addEventListener("change", function (e) { if (e.target.files[0]) importDecisions(e.target.files[0]); e.target.value = ""; });
  $("clear").addEventListener("click", function () {
    if (window.confirm("Forget every decision made on this page?")) { decisions = {}; save(); applyFilters(); }
  });
  document.addEventListener("keydown", onKey);
  if (!DATA.applicable) {
    $("decide").hidden = true;
    say("this run already moved files: decisions cannot be applied to this report");
  }
  document.body.setAttribute("data-broken", "0");
  save();
  applyFilters();
  document.body.setAttribute("data-ready", "1");
})();
