"""The status page at the admin listener's ``/``: server-rendered HTML and a little JavaScript.

The server renders everything from the same reports the JSON API serves; the script only turns
UTC times into the browser's local time, refreshes the page's body every few seconds (not while
the operator is selecting or typing) and posts replays to the API."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from . import __version__, reports

if TYPE_CHECKING:
    from .app import Daemon

REFRESH_MS = 5000


def _t(iso: str | None) -> str:
    """A time the script shows in local time; without the script it reads as UTC."""
    if not iso:
        return "—"
    return f'<time datetime="{escape(iso)}">{escape(iso)}</time>'


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _health(ok: bool, text: str) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{escape(text)}</span>'


def _table(head: list[str], rows: list[list[str]], empty: str, id_: str) -> str:
    if not rows:
        return f'<p class="empty" id="{id_}-empty">{escape(empty)}</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{id_}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


async def render(d: Daemon, query: str = "", fragment: bool = False) -> str:
    st = await reports.status(d.store, d.settings, d)
    dlq = await reports.dlq_list(d.store, limit=200)
    refused = await reports.rejections(d.store, limit=20)
    parts = [_search(query)]
    if query:
        parts.append(await _story(d, query))
    parts.append(_queues(st))
    parts.append(_sources(st["sources"]))
    parts.append(_sinks(st["sinks"]))
    parts.append(_dlq(dlq, st["dead_letters"]))
    parts.append(_refused(refused))
    main = "\n".join(parts)
    if fragment:
        return main
    return PAGE.format(version=escape(__version__), main=main, refresh=REFRESH_MS, script=SCRIPT, style=STYLE)


def _search(query: str) -> str:
    return (
        '<form id="search" method="get" action="/"><label>Find an event '
        f'<input name="q" value="{escape(query)}" placeholder="integrand id, provider id or source:id"></label>'
        ' <button type="submit">Search</button></form>'
    )


async def _story(d: Daemon, query: str) -> str:
    try:
        stories = await reports.events_show(d.store, query)
    except reports.NotFound as e:
        return f'<section id="story"><h2>Search</h2><p class="bad">{escape(str(e))}</p></section>'
    out = ['<section id="story"><h2>Event story</h2>']
    for s in stories:
        ev = s["event"]
        out.append(f"<h3>event {ev['row']} — {escape(ev['source'])}:{escape(ev['id'])} ({escape(ev['type'])})</h3>")
        rows = [
            [
                _t(h["at"]),
                escape(h["action"]),
                str(h["delivery"] or ""),
                escape((h["detail"] or "").splitlines()[0] if h["detail"] else ""),
            ]
            for h in s["history"]
        ]
        out.append(_table(["when", "what", "delivery", "detail"], rows, "no history", f"story-{ev['row']}"))
        out.append(
            "<details><summary>event data</summary><pre>"
            + escape(orjson.dumps(ev["data"], option=orjson.OPT_INDENT_2).decode())
            + "</pre></details>"
        )
    out.append("</section>")
    return "\n".join(out)


def _queues(st: dict[str, Any]) -> str:
    states = ("ready", "leased", "done", "dead")
    rows = [
        [escape(sink), *[str(counts.get(s, 0)) for s in states]] for sink, counts in sorted(st["deliveries"].items())
    ]
    return (
        f'<section id="queues"><h2>Queues</h2><p>{st["events"]} event(s) stored; '
        f"{st['dead_letters']} dead-lettered.</p>"
        + _table(["sink", *states], rows, "no deliveries yet", "queue-table")
        + "</section>"
    )


def _sources(sources: list[dict[str, Any]]) -> str:
    rows = []
    for s in sources:
        kinds = ", ".join(k for k, on in (("webhooks", s["webhooks"]), ("polling", s["polling"])) if on) or "—"
        stream = s.get("stream") or {}
        if stream:
            kinds += f" (stream {stream.get('state')})"
        healthy = not s.get("last_error") and not stream.get("last_error")
        lag, target = s.get("poll_lag"), s.get("target_latency")
        if s["polling"] and lag is not None and target is not None and lag > 2 * target:
            healthy = False
        health = _health(
            healthy, "ok" if healthy else (s.get("last_error") or stream.get("last_error") or "polls late")
        )
        cursor = "—" if s["cursor"] is None else escape(orjson.dumps(s["cursor"]).decode()[:80])
        rows.append(
            [
                escape(s["name"]),
                escape(s["connector"]),
                kinds,
                health,
                str(s["pending"]),
                _age(s["lag"]),
                _t(s.get("last_poll")),
                _age(s.get("interval")),
                _t(s.get("next_poll")),
                f"{_age(lag)} / {_age(target)}" if s["polling"] else "—",
                f"<code>{cursor}</code>",
            ]
        )
    head = [
        "source",
        "connector",
        "kind",
        "health",
        "pending",
        "lag",
        "last poll",
        "interval",
        "next poll",
        "poll lag / target",
        "cursor",
    ]
    return '<section id="sources"><h2>Sources</h2>' + _table(head, rows, "no sources", "source-table") + "</section>"


def _sinks(sinks: list[dict[str, Any]]) -> str:
    rows = []
    for s in sinks:
        b = s.get("breaker") or {}
        healthy = bool(s.get("healthy", True))
        text = "ok" if healthy else ("paused: credentials refused" if s.get("paused") else f"breaker {b.get('status')}")
        rows.append(
            [
                escape(s["name"]),
                escape(s["connector"]),
                _health(healthy, text),
                escape(str(b.get("status", "—"))),
                str(s["backlog"]),
                _age(s["oldest_pending_age"]),
                str(s["dead"]),
                str(s["delivered"]),
            ]
        )
    head = ["sink", "connector", "health", "breaker", "backlog", "oldest pending", "dead", "delivered"]
    return '<section id="sinks"><h2>Sinks</h2>' + _table(head, rows, "no sinks", "sink-table") + "</section>"


def _dlq(dlq: list[dict[str, Any]], total: int) -> str:
    rows = []
    for x in dlq:
        err = (x["last_error"] or "").splitlines()[0] if x["last_error"] else ""
        rows.append(
            [
                f'<input type="checkbox" class="pick" value="{x["id"]}" aria-label="select {x["id"]}">',
                str(x["id"]),
                f'<a href="/?q={escape(quote(x["source"] + ":" + x["event_id"], safe=""))}">{escape(x["event_id"])}</a>',
                escape(x["source"]),
                escape(x["sink"]),
                str(x["attempts"]),
                _t(x["updated_at"]),
                f'<span class="err">{escape(err[:200])}</span>',
                f'<button class="replay" data-id="{x["id"]}">Replay</button>',
            ]
        )
    bulk = (
        '<p class="bulk"><button id="replay-selected">Replay selected</button> '
        '<button id="replay-all">Replay all</button> <span id="result" role="status"></span></p>'
        if dlq
        else '<p><span id="result" role="status"></span></p>'
    )
    head = ["", "id", "event", "source", "sink", "tries", "when", "last error", ""]
    return (
        f'<section id="dlq"><h2>Dead-letter queue ({total})</h2>'
        + (
            f"<p>showing the oldest {len(dlq)}; <code>integrand dlq list</code> lists them all</p>"
            if total > len(dlq)
            else ""
        )
        + bulk
        + _table(head, rows, "the dead-letter queue is empty", "dlq-table")
        + "</section>"
    )


def _refused(refused: list[dict[str, Any]]) -> str:
    rows = []
    for r in refused:
        headers = "\n".join(f"{k}: {v}" for k, v in r["headers"].items())
        rows.append(
            [
                _t(r["at"]),
                escape(r["source"]),
                str(r["status"]),
                escape(r["reason"]),
                escape(r["remote"] or ""),
                f"<details><summary>{len(r['headers'])} header(s)</summary><pre>{escape(headers)}</pre></details>",
            ]
        )
    head = ["when", "source", "status", "reason", "from", "headers (redacted)"]
    return (
        '<section id="refused"><h2>Refused webhooks</h2>'
        + _table(head, rows, "no refused webhooks", "refused-table")
        + "</section>"
    )


def login_page() -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>integrand admin</title></head><body>"
        "<h1>integrand admin</h1><form method='post' action='/login'><label>Admin token "
        "<input type='password' name='token' autocomplete='current-password'></label> "
        "<button type='submit'>Sign in</button></form></body></html>"
    )


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.ok { color: #186a2e; } .bad { color: #b00020; font-weight: 600; } .err { color: #8a1c1c; }
.empty { color: #666; } code, pre { font-size: 12px; } pre { margin: 0; white-space: pre-wrap; }
header { display: flex; gap: 1em; align-items: baseline; } header small { color: #666; }
"""

SCRIPT = """
const REFRESH_MS = %(refresh)d;
function localTimes(root) {
  for (const t of root.querySelectorAll('time[datetime]')) {
    const d = new Date(t.getAttribute('datetime'));
    if (!isNaN(d)) { t.textContent = d.toLocaleString(); t.title = t.getAttribute('datetime'); }
  }
}
function busy() {
  const a = document.activeElement;
  return (a && a.tagName === 'INPUT' && a.type !== 'checkbox') || document.querySelector('.pick:checked');
}
async function refresh(force) {
  if (!force && busy()) return;
  const q = new URLSearchParams(location.search).get('q') || '';
  const r = await fetch('/?fragment=1' + (q ? '&q=' + encodeURIComponent(q) : ''), {credentials: 'same-origin'});
  if (!r.ok) return;
  const main = document.querySelector('main');
  main.innerHTML = await r.text();
  localTimes(main);
  document.getElementById('updated').textContent = new Date().toLocaleTimeString();
}
async function replay(body) {
  const r = await fetch('/api/dlq/replay', {method: 'POST', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const data = await r.json();
  await refresh(true);
  const out = document.getElementById('result');
  if (out) out.textContent = r.ok ? 'replayed ' + data.replayed : 'error: ' + data.error;
}
document.addEventListener('click', (e) => {
  const b = e.target.closest('button');
  if (!b) return;
  if (b.classList.contains('replay')) replay({ids: [Number(b.dataset.id)]});
  else if (b.id === 'replay-selected') {
    const ids = [...document.querySelectorAll('.pick:checked')].map((c) => Number(c.value));
    if (ids.length) replay({ids});
  } else if (b.id === 'replay-all') replay({all: true});
});
localTimes(document);
setInterval(refresh, REFRESH_MS);
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>integrand status</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body><header><h1>integrand</h1><small>version {version} · refreshed <span id="updated">now</span>,
every {refresh} ms</small></header>
<main>
{main}
</main>
<script>{script}</script>
</body></html>
"""
SCRIPT = SCRIPT % {"refresh": REFRESH_MS}
