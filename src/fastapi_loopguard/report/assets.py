"""The report page's stylesheet and live script, and the policy that allows only them.

Both are inline, so the page loads nothing; the Content-Security-Policy names each by its hash.
"""

from __future__ import annotations

import base64
import hashlib

from ..events import KINDS
from . import flame

_KIND_COLOURS = {
    "sleep": ("#0072b2", "#56a8e0"),
    "io": ("#e69f00", "#f0b534"),
    "cpu": ("#d55e00", "#ff7a2e"),
    "lock": ("#cc79a7", "#e39bc5"),
    "gil": ("#009e73", "#2fc597"),
    "native": ("#5e4fa2", "#9d8ff0"),
    "gc": ("#a68a00", "#d8bd2c"),
    "starved": ("#882255", "#c05090"),
    "cumulative": ("#44aa99", "#6fd3c2"),
    "unknown": ("#808080", "#a0a0a0"),
}


def _kind_css() -> str:
    light = "".join(f"--k-{k}:{c[0]};" for k, c in _KIND_COLOURS.items())
    dark = "".join(f"--k-{k}:{c[1]};" for k, c in _KIND_COLOURS.items())
    rules = "".join(
        f".k-{k}{{fill:var(--k-{k})}}.pill.k-{k}{{background:var(--k-{k})}}" for k in KINDS
    )
    return f":root{{{light}}}@media (prefers-color-scheme:dark){{:root{{{dark}}}}}{rules}"


CSS = (
    """
:root{--bg:#fff;--fg:#1c2230;--muted:#5d6677;--card:#f3f5f9;--line:#dfe3ea;--hit:#fde7d6;
--lag:#6a7fb0;--over:#d55e00}
@media (prefers-color-scheme:dark){:root{--bg:#14171d;--fg:#e7eaf0;--muted:#9aa3b5;
--card:#1e232c;--line:#2f3643;--hit:#4a2e1c;--lag:#8fa3d6}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:20px 24px 48px}
header h1{font-size:22px;margin:0}
header p{margin:4px 0 0;color:var(--muted)}
.live{display:inline-block;margin-left:8px;padding:1px 8px;border-radius:10px;
background:var(--card);font-size:13px}
.live.err{color:var(--over)}
section{margin-top:30px}
section:empty{margin:0}
#lg-durations{margin-top:14px}
h2{font-size:18px;margin:0 0 10px}
.muted{color:var(--muted)}
.empty{color:var(--muted);font-style:italic}
.warn{color:var(--over)}
code{font:13px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(165px,1fr));gap:12px}
.card{background:var(--card);border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.card span{color:var(--muted);font-size:13px}
.scroll{overflow-x:auto}
.chart{display:block;width:100%;min-width:600px;height:auto}
svg text{font-family:inherit}
.axis{font-size:13px;fill:var(--muted)}
.halo{paint-order:stroke;stroke:var(--bg);stroke-width:4px;fill:var(--fg)}
.count{font-size:13px;fill:var(--fg)}
.grid{stroke:var(--line)}
.axis-line{stroke:var(--muted)}
.threshold{stroke:var(--fg);stroke-dasharray:6 4;opacity:.55}
rect.k{opacity:.85}
.legend{list-style:none;display:flex;flex-wrap:wrap;gap:4px 14px;padding:0;margin:0 0 8px;
font-size:13px}
.legend li{display:flex;align-items:center;gap:5px}
.swatch{width:11px;height:11px}
.rows{display:grid;gap:10px}
.row{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,3fr) 96px;gap:4px 14px;
align-items:center}
.row .value{text-align:right;font-variant-numeric:tabular-nums}
.row .label small{display:block;color:var(--muted)}
.hbar{display:block;width:100%;height:16px;background:var(--card);border-radius:3px}
.lag{fill:var(--lag)}
.lag-over{fill:var(--over)}
.marker{stroke:var(--fg);stroke-width:2}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:6px 8px;vertical-align:top}
th{font-size:13px;color:var(--muted);font-weight:600;border-bottom:1px solid var(--line)}
th.n,td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody.culprit{border-bottom:1px solid var(--line)}
td.snippet{padding-top:0}
pre.src{margin:0;padding:6px 0;background:var(--card);border-radius:6px;overflow-x:auto;
font:13px/1.45 ui-monospace,"DejaVu Sans Mono",monospace}
pre.src span{display:block;padding:0 10px;white-space:pre}
pre.src span.hit{background:var(--hit)}
pre.src i{display:inline-block;min-width:3.5em;color:var(--muted);font-style:normal}
.pill{display:inline-block;min-width:4.2em;text-align:center;padding:0 7px;border-radius:9px;
color:#fff;font-size:12px;font-weight:600}
details.event{border:1px solid var(--line);border-radius:6px;margin:6px 0;padding:4px 10px}
details.event summary{cursor:pointer;display:flex;flex-wrap:wrap;gap:2px 10px;
align-items:baseline}
details.event dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 12px;
margin:8px 0}
details.event dt{color:var(--muted)}
details.event dd{margin:0;overflow-wrap:anywhere}
ol.stack{margin:6px 0 8px;padding-left:2.2em;font-size:13px}
ol.stack li.culprit{font-weight:600}
ol.stack pre.src{margin:4px 0;font-weight:400}
td.fix{padding-top:2px}
.fix code{font-weight:600}
.fix .call{color:var(--muted)}
footer{margin-top:40px;color:var(--muted);font-size:13px}
@media (max-width:700px){
main{padding:14px 12px 40px}
.axis,.count{font-size:19px}
.row{grid-template-columns:minmax(0,1fr) auto}
.row .label{grid-column:1/-1}
table.culprits{display:block}
table.culprits thead{display:none}
table.culprits tr,table.culprits td{display:block}
table.culprits td{padding:2px 4px}
table.culprits td.n{text-align:left}
table.culprits td[data-label]::before{content:attr(data-label) ": ";color:var(--muted)}
tbody.culprit{display:block;padding:8px 0}
}
""".strip()
    + _kind_css()
    + flame.CSS
)

# The live page's only script: poll data.json, replace the sections, prepend new events.
LIVE_JS = """
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("lg-config").textContent);
  var seq = cfg.seq;
  var status = document.getElementById("lg-status");
  var list = document.getElementById("lg-events-list");
  var token = new URLSearchParams(location.search).get("token");
  var url = location.pathname.replace(/\\/?$/, "/") + "data.json";
  function poll() {
    var headers = token ? {"X-LoopGuard-Token": token} : {};
    fetch(url + "?since=" + seq, {headers: headers, cache: "no-store"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (data) {
        Object.keys(data.sections).forEach(function (id) {
          var el = document.getElementById(id);
          if (el) { el.innerHTML = data.sections[id]; }
        });
        if (data.reset) { list.innerHTML = ""; }
        data.events.forEach(function (html) { list.insertAdjacentHTML("afterbegin", html); });
        while (list.children.length > cfg.max_events) { list.lastElementChild.remove(); }
        seq = data.seq;
        status.textContent = "live, updated " + new Date().toLocaleTimeString();
        status.className = "live";
      })
      .catch(function () {
        status.textContent = "live, server unreachable: retrying";
        status.className = "live err";
      })
      .then(function () { setTimeout(poll, cfg.interval_ms); });
  }
  setTimeout(poll, cfg.interval_ms);
})();
""".strip()


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def content_security_policy(live: bool) -> str:
    """Nothing may load or run but this page's own stylesheet (and, live, its own script)."""
    policy = f"default-src 'none'; style-src 'sha256-{_sha256(CSS)}'; img-src data:"
    if live:
        policy += f"; script-src 'sha256-{_sha256(LIVE_JS)}'; connect-src 'self'"
    return policy
