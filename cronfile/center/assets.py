"""The dashboard's stylesheet and script, served by the center itself (no CDN, no build).

Separate files rather than inline so that the pages can carry a strict
Content-Security-Policy (``script-src 'self'``): nothing injected into a page can run.
"""

from __future__ import annotations

CSS = """
:root { --bg:#f4f6f9; --card:#fff; --ink:#1c2430; --muted:#6b7685; --line:#e3e7ee;
  --accent:#2f6fed; --ok:#1f9d55; --bad:#d64545; --warn:#d98e04; --idle:#c7ced8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:16px; padding:10px 24px; background:#141b26;
  color:#dfe6f0; }
header .brand { color:#fff; font-weight:700; font-size:17px; text-decoration:none;
  letter-spacing:.3px; }
header .rev { color:#9fb0c5; } header code { color:#fff; }
.spacer { flex:1; }
main { padding:20px 24px; max-width:1500px; margin:0 auto; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; overflow-x:auto;
  padding:14px 18px; margin-bottom:18px; box-shadow:0 1px 2px rgba(20,30,50,.04); }
h2 { font-size:15px; margin:2px 0 12px; display:flex; align-items:center; gap:10px; }
h3 { font-size:13px; margin:16px 0 6px; }
.muted { color:var(--muted); font-weight:400; }
table { width:100%; border-collapse:collapse; }
th { text-align:left; font-weight:600; color:var(--muted); font-size:12px;
  text-transform:uppercase; letter-spacing:.4px; padding:6px 8px; border-bottom:1px solid var(--line); }
td { padding:7px 8px; border-bottom:1px solid var(--line); vertical-align:middle; }
tr:last-child td { border-bottom:0; }
tr.job.failed { background:#fff5f5; } tr.job.failed td.name b { color:var(--bad); }
tr.job.suspended { opacity:.6; }
td.name .muted { font-size:12px; }
code { font:12px ui-monospace,SFMono-Regular,Menlo,monospace; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
  font-weight:600; background:var(--idle); color:#fff; }
.badge.none { background:transparent; color:var(--muted); font-weight:400; padding:0; }
.s-succeeded { background:var(--ok); } .s-failed,.s-timeout,.s-lost { background:var(--bad); }
.s-killed,.s-no_agent,.s-missed { background:var(--warn); } .s-skipped { background:var(--idle); }
.s-running,.s-dispatched { background:var(--accent); }
.badge-run { font-size:12px; color:var(--accent); font-weight:600; }
.strip { display:inline-flex; align-items:flex-end; gap:2px; height:22px; }
.strip .tick { display:inline-block; width:8px; border-radius:2px; min-height:8px; }
.tiles { display:grid; grid-template-columns:repeat(5,1fr); gap:14px; margin-bottom:18px; }
.tile { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
.tile .v { font-size:22px; font-weight:700; } .tile .k { color:var(--muted); font-size:12px; }
#tile-failing .v { color:var(--bad); }
.grid2 { display:grid; grid-template-columns:minmax(0,2fr) minmax(0,1fr); gap:18px; }
.grid2 > .card { margin-bottom:18px; }
.heatmap { display:flex; flex-direction:column; gap:2px; }
.hrow { display:grid; grid-template-columns:40px repeat(60, 1fr); gap:2px; align-items:center; }
.hl { font-size:10px; color:var(--muted); }
.heatmap i { display:block; height:9px; border-radius:2px; }
.legend i { display:inline-block; width:12px; height:9px; border-radius:2px; }
#agents td, #agents th { font-size:12px; white-space:nowrap; }
.l0 { background:#eef1f5; } .l1 { background:#c6dbff; } .l2 { background:#8fb6ff; }
.l3 { background:#4d8af5; } .l4 { background:#f08c3a; } .l5 { background:#d64545; }
.legend { margin-top:8px; font-size:12px; color:var(--muted); display:flex; gap:3px; align-items:center; }
.dot { display:inline-block; width:8px; height:8px; border-radius:50%; margin-right:6px; }
.dot.connected { background:var(--ok); } .dot.disconnected { background:var(--bad); }
.label { background:#eef1f5; border-radius:4px; padding:1px 6px; font-size:12px; margin-right:4px; }
button { font:inherit; border:1px solid var(--line); background:#fff; border-radius:6px;
  padding:3px 10px; cursor:pointer; }
button:hover { border-color:var(--accent); color:var(--accent); }
button.primary { background:var(--accent); color:#fff; border-color:var(--accent); padding:8px 14px; }
button.danger { color:var(--bad); border-color:var(--bad); }
button.link { background:none; border:0; color:#9fb0c5; }
form.inline { display:inline; margin:0; }
#filter { margin-left:auto; font:inherit; padding:3px 8px; border:1px solid var(--line);
  border-radius:6px; font-weight:400; }
.alert { border-color:#f1b4b4; background:#fff7f7; } .alert h2 { color:var(--bad); }
pre#output { background:#0f1620; color:#d6e2f0; padding:12px; border-radius:8px;
  overflow:auto; max-height:420px; }
dl.facts { display:grid; grid-template-columns:110px 1fr; gap:4px 12px; margin:0 0 14px; }
dl.facts dt { color:var(--muted); }
body.login { display:flex; align-items:center; justify-content:center; min-height:100vh; }
.login-card { width:360px; display:flex; flex-direction:column; gap:8px; }
.login-card h1 { margin:0; font-size:22px; }
.login-card input { font:inherit; padding:8px; border:1px solid var(--line); border-radius:6px; }
.error { color:var(--bad); }
"""

JS = """
// Filter the jobs table; confirm stops; refresh the page every 15 s while nobody types.
(function () {
  var filter = document.getElementById('filter');
  var typing = 0;
  if (filter) {
    filter.addEventListener('input', function () {
      typing = Date.now();
      var q = filter.value.toLowerCase();
      document.querySelectorAll('#jobs tbody tr').forEach(function (row) {
        row.style.display = row.dataset.job.indexOf(q) >= 0 ? '' : 'none';
      });
    });
  }
  document.querySelectorAll('form[data-confirm]').forEach(function (form) {
    form.addEventListener('submit', function (ev) {
      if (!window.confirm(form.dataset.confirm)) { ev.preventDefault(); }
    });
  });
  setInterval(function () {
    if (Date.now() - typing > 20000 && !(filter && filter.value)) { window.location.reload(); }
  }, 15000);
})();
"""

__all__ = ["CSS", "JS"]
