"""The search page of `lightcrl serve`: one self-contained HTML document (no external assets).

Results of ``/?q=...`` are computed by the server and embedded as JSON, so the first paint already shows
them (a screenshot or a browser without scripts sees the grid); later searches and uploads call the JSON
API. Every text from the index reaches the page through ``textContent``, never as HTML.
"""

from __future__ import annotations

import html
import json
from typing import Any

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#fff;border-bottom:1px solid #e3e5e8;padding:14px 24px;display:flex;gap:18px;
align-items:center;flex-wrap:wrap}
h1{font-size:1.15em;margin:0;font-weight:650}
form{display:flex;gap:8px;align-items:center}
input[type=search]{width:min(46vw,520px);padding:8px 12px;font-size:1em;border:1px solid #c9ccd1;
border-radius:6px}
button,.upload{padding:8px 14px;font-size:.95em;border-radius:6px;border:1px solid #1a5fb4;background:#1a5fb4;
color:#fff;cursor:pointer}
.upload{background:#fff;color:#1a5fb4}.upload input{display:none}
main{padding:18px 24px;max-width:1400px;margin:0 auto}
.meta{color:#5f6368;font-size:.9em;margin:0 0 12px}.error{color:#b3261e}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e3e5e8;border-radius:8px;overflow:hidden}
figure img{display:block;width:100%;height:190px;object-fit:cover;background:#eceef1}
figure audio{width:100%;margin-top:8px}
figcaption{padding:8px 10px;font-size:.85em}
.rank{font-weight:650}.score{float:right;font-variant-numeric:tabular-nums;color:#1a5fb4}
.caption{display:block;margin-top:4px;color:#333;line-height:1.3}
.path{display:block;color:#80868b;font-size:.85em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{height:3px;background:#1a5fb4;margin-top:6px;border-radius:2px}
""".strip()

_JS = r"""
const state = JSON.parse(document.getElementById('initial').textContent);
const info = JSON.parse(document.getElementById('info').textContent);
const grid = document.getElementById('grid'), meta = document.getElementById('meta');
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function render(res) {
  grid.replaceChildren();
  meta.className = 'meta';
  if (!res) { meta.textContent = `${info.count} ${info.modality} items (${info.structure} search). ` +
      'Type a query, or upload an example.'; return; }
  if (res.error) { meta.className = 'meta error'; meta.textContent = res.error; return; }
  meta.textContent = `Top ${res.results.length} of ${res.count} for "${res.query}"`;
  const top = Math.max(1e-9, ...res.results.map(r => r.score));
  res.results.forEach((r, i) => {
    const fig = el('figure');
    if (r.media && res.modality === 'image') {
      const a = el('a'); a.href = r.media;
      const img = el('img'); img.src = r.media + '?thumb=1'; img.alt = r.caption || r.path || '';
      img.loading = 'eager'; a.append(img); fig.append(a);
    }
    const cap = el('figcaption');
    cap.append(el('span', 'rank', '#' + (i + 1)), el('span', 'score', r.score.toFixed(3)));
    if (r.media && res.modality === 'audio') {
      const au = el('audio'); au.controls = true; au.preload = 'none'; au.src = r.media; cap.append(au);
    }
    if (r.caption) cap.append(el('span', 'caption', r.caption));
    if (r.label) cap.append(el('span', 'caption', r.label));
    if (r.path) { const p = el('span', 'path', r.path); p.title = r.path; cap.append(p); }
    const bar = el('div', 'bar'); bar.style.width = Math.max(2, 100 * Math.max(r.score, 0) / top) + '%';
    cap.append(bar); fig.append(cap); grid.append(fig);
  });
}
async function call(url, opts) {
  meta.className = 'meta'; meta.textContent = 'searching...';
  try {
    const resp = await fetch(url, opts);
    const body = await resp.json();
    render(resp.ok ? body : {error: body.detail || resp.statusText});
  } catch (e) { render({error: String(e)}); }
}
document.getElementById('search').addEventListener('submit', ev => {
  ev.preventDefault();
  const q = document.getElementById('q').value.trim();
  if (!q) return;
  history.pushState(null, '', '/?q=' + encodeURIComponent(q));
  call('/api/search?k=' + state.k + '&q=' + encodeURIComponent(q));
});
document.getElementById('file').addEventListener('change', ev => {
  const f = ev.target.files[0];
  if (!f) return;
  if (f.size > info.max_upload_bytes) {
    render({error: `the file is over ${info.max_upload_bytes} bytes`}); return;
  }
  const fd = new FormData(); fd.append('file', f);
  call('/api/search?k=' + state.k, {method: 'POST', body: fd});
});
render(state.result);
"""


def _json_script(obj: Any) -> str:
    """JSON safe inside <script>: no '<' can close the element."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(info: dict[str, Any], result: dict[str, Any] | None, query: str, k: int) -> str:
    accept = "image/*" if info["modality"] != "audio" else "audio/*,image/*"
    if "audio" in info["encoders"] and "image" in info["encoders"]:
        accept = "image/*,audio/*"
    e = html.escape
    title = f"{query} - lightcrl search" if query else "lightcrl search"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>", "</head>", "<body>",
        "<header><h1>lightcrl search</h1>",
        '<form id="search" action="/" method="get">'
        f'<input id="q" name="q" type="search" placeholder="describe what you are looking for" '
        f'value="{e(query, quote=True)}" autofocus><button type="submit">Search</button></form>',
        f'<label class="upload">Search by example<input id="file" type="file" accept="{accept}"></label>',
        "</header>",
        '<main><p id="meta" class="meta"></p><div id="grid" class="grid"></div></main>',
        f'<script id="initial" type="application/json">{_json_script({"result": result, "k": k})}</script>',
        f'<script id="info" type="application/json">{_json_script(info)}</script>',
        f"<script>{_JS}</script>", "</body>", "</html>", ""])
