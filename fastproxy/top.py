"""`fastproxy top`: the live sessions of a running proxy, from its admin endpoint.

A curses table refreshed every --interval seconds (GET /sessions on a background thread, so
the keys stay responsive while the proxy is slow or gone): remote address, ClientId, CN,
upstream, age, bytes in/out, idle, worker pid. Keys: s / S cycle the sort column, r reverses
it, / edits a ClientId filter (a case-insensitive substring; Enter keeps it, Esc restores the
previous one), Esc clears it, arrows / j / k / PgUp / PgDn / Home / End move the selection, d
disconnects the selected session (POST /disconnect, after y), q quits.

Without a terminal (stdout not a tty) or with --once the table is printed once as text.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

# fastproxy.admin (http.server and the rest) is imported when top runs, not when cli.py builds
# its parser. These two equal admin.SESSIONS_LIMIT and admin.SESSIONS_MAX (a test checks).
SESSIONS_LIMIT = 1000
SESSIONS_MAX = 100000
MIN_WIDTH = 40
MIN_HEIGHT = 6


# ----------------------------------------------------------------------------- formatting


def fmt_duration(s: Any) -> str:
    """Seconds as 5s, 3m12s, 2h05m, 3d04h."""
    if not isinstance(s, (int, float)) or s < 0:
        return "-"
    n = int(s)
    if n < 60:
        return f"{s:.1f}s" if s < 10 else f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def fmt_bytes(n: Any) -> str:
    """A byte count as 512, 1.2K, 3.4M, 1.1G (powers of 1024)."""
    if not isinstance(n, int):
        return "-"
    v = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if v < 1024 or unit == "T":
            return str(n) if unit == "" else (f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}")
        v /= 1024
    return str(n)  # pragma: no cover


def remote_of(row: dict) -> str:
    host, port = str(row.get("addr", "?")), row.get("port", "?")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(v: Any) -> str:
    if v is None:
        return "-"
    # a ClientId may hold anything: control characters would move the cursor
    return "".join(c if c.isprintable() else "?" for c in str(v))


def _addr_key(row: dict) -> tuple:
    try:
        ip = ipaddress.ip_address(str(row.get("addr")))
        return (ip.version, ip.packed, row.get("port") or 0)
    except ValueError:
        return (9, str(row.get("addr")).encode(), row.get("port") or 0)


def _num(key: str) -> Callable[[dict], Any]:
    return lambda r: r.get(key) if isinstance(r.get(key), (int, float)) else -1


def _str(key: str) -> Callable[[dict], Any]:
    return lambda r: (r.get(key) is None, str(r.get(key) or ""))


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    value: Callable[[dict], str]
    sort: Callable[[dict], Any]
    right: bool = False      # numbers: aligned right
    flex: bool = False       # shares the width left over (text that may be long)
    min_width: int = 0


COLUMNS: list[Column] = [
    Column("remote", "REMOTE", remote_of, _addr_key, flex=True, min_width=15),
    Column("client_id", "CLIENTID", lambda r: _text(r.get("client_id")), _str("client_id"), flex=True, min_width=8),
    Column("cn", "CN", lambda r: _text(r.get("cn")), _str("cn"), flex=True, min_width=4),
    Column("upstream", "UPSTREAM", lambda r: _text(r.get("upstream")), _str("upstream"), flex=True, min_width=8),
    Column("age", "AGE", lambda r: fmt_duration(r.get("age")), _num("age"), right=True),
    Column("in", "IN", lambda r: fmt_bytes(r.get("bytes_received")), _num("bytes_received"), right=True),
    Column("out", "OUT", lambda r: fmt_bytes(r.get("bytes_sent")), _num("bytes_sent"), right=True),
    Column("idle", "IDLE", lambda r: fmt_duration(r.get("idle")), _num("idle"), right=True),
    Column("pid", "PID", lambda r: _text(r.get("pid")), _num("pid"), right=True),
]
SORT_KEYS = [c.key for c in COLUMNS]


def _fit(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        text = text[: max(width - 1, 0)] + "~" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def layout(titles: Sequence[str], cells: Sequence[Sequence[str]], width: int | None) -> list[int]:
    """Column widths: each as wide as its title and values; with a width, the text columns
    are cut down (to their minimum at most) until the line fits."""
    natural = [max([len(t)] + [len(row[i]) for row in cells]) for i, t in enumerate(titles)]
    if width is None:
        return natural
    widths = list(natural)
    total = sum(widths) + len(widths) - 1
    while total > width:
        flex = [i for i, c in enumerate(COLUMNS) if c.flex and widths[i] > max(c.min_width, len(titles[i]))]
        if not flex:
            break
        i = max(flex, key=lambda j: widths[j])
        widths[i] -= 1
        total -= 1
    return widths


def format_line(cells: Sequence[str], widths: Sequence[int], width: int | None = None) -> str:
    line = " ".join(_fit(s, w, c.right) for s, w, c in zip(cells, widths, COLUMNS))
    line = line.rstrip()
    return line[:width] if width is not None else line


# ----------------------------------------------------------------------------- the view


@dataclass
class View:
    """What `top` shows: the last answer, filtered and sorted, and the selection. No curses
    here, so that it can be tested on its own."""

    sort: str = "client_id"
    reverse: bool = False
    filter: str = ""
    doc: dict | None = None
    error: str | None = None
    fetched: float = 0.0            # time.time() of the last good answer
    selected: int = 0
    selected_key: tuple | None = None
    message: str = ""
    rows: list[dict] = field(default_factory=list)

    def update(self, doc: dict | None, error: str | None, fetched: float = 0.0) -> None:
        if doc is not None:
            self.doc, self.fetched = doc, fetched or time.time()
        self.error = error
        self._refilter()

    def _refilter(self) -> None:
        sessions = [r for r in (self.doc or {}).get("sessions", []) if isinstance(r, dict)]
        f = self.filter.casefold()
        if f:
            sessions = [r for r in sessions if f in str(r.get("client_id") or "").casefold()]
        col = COLUMNS[SORT_KEYS.index(self.sort)]
        sessions.sort(key=lambda r: (col.sort(r), _addr_key(r)), reverse=self.reverse)
        self.rows = sessions
        keys = [self.key(r) for r in sessions]
        if self.selected_key in keys:
            self.selected = keys.index(self.selected_key)
        self.select(self.selected)

    @staticmethod
    def key(row: dict) -> tuple:
        return (row.get("pid"), row.get("addr"), row.get("port"))

    def select(self, index: int) -> None:
        self.selected = max(0, min(index, len(self.rows) - 1)) if self.rows else 0
        self.selected_key = self.key(self.rows[self.selected]) if self.rows else None

    def move(self, delta: int) -> None:
        self.select(self.selected + delta)

    def selected_row(self) -> dict | None:
        return self.rows[self.selected] if self.rows else None

    def cycle_sort(self, step: int = 1) -> None:
        self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + step) % len(SORT_KEYS)]
        self._refilter()

    def toggle_reverse(self) -> None:
        self.reverse = not self.reverse
        self._refilter()

    def set_filter(self, text: str) -> None:
        self.filter = text
        self._refilter()

    # --- text

    def summary(self) -> str:
        doc = self.doc or {}
        total = len(doc.get("sessions") or [])
        workers = doc.get("workers", 0)
        parts = [f"{total} session{'s' if total != 1 else ''}"]
        if self.filter:
            parts.append(f"{len(self.rows)} matching")
        if doc.get("truncated"):
            parts.append(f"first {doc.get('limit')} only")
        parts.append(f"{workers} worker{'s' if workers != 1 else ''}")
        missing = doc.get("errors") or []
        if missing:
            parts.append(f"{len(missing)} not answering")
        return ", ".join(parts)

    def settings(self) -> str:
        title = COLUMNS[SORT_KEYS.index(self.sort)].title
        return f"sort {title} {'desc' if self.reverse else 'asc'}" + (f", filter '{self.filter}'" if self.filter else "")

    def table(self, width: int | None = None) -> tuple[str, list[str]]:
        """(the column titles, one line per visible row), fitted to width when given."""
        cells = [[c.value(r) for c in COLUMNS] for r in self.rows]
        titles = [c.title + ("*" if c.key == self.sort else "") for c in COLUMNS]
        widths = layout(titles, cells, width)
        return format_line(titles, widths, width), [format_line(row, widths, width) for row in cells]


def render_text(view: View, address: str) -> str:
    """--once: the header and the whole table, no line cut."""
    head, lines = view.table(None)
    out = [f"fastproxy top: {address}: {view.summary()} ({view.settings()})", head, *lines]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- fetching


class Fetcher:
    """GET /sessions every interval on a daemon thread; refresh() asks at once."""

    def __init__(self, address: str, interval: float, limit: int, timeout: float) -> None:
        self.address, self.interval, self.limit, self.timeout = address, interval, limit, timeout
        self.lock = threading.Lock()
        self.doc: dict | None = None
        self.error: str | None = None
        self.fetched = 0.0
        self.version = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastproxy-top", daemon=True)

    def start(self) -> Fetcher:
        self._thread.start()
        return self

    def refresh(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def snapshot(self) -> tuple[int, dict | None, str | None, float]:
        with self.lock:
            return self.version, self.doc, self.error, self.fetched

    def _run(self) -> None:
        from .admin import AdminError, fetch_sessions

        while not self._stop.is_set():
            try:
                doc: dict | None = fetch_sessions(self.address, limit=self.limit, timeout=self.timeout)
                error = None
            except AdminError as e:
                doc, error = None, str(e)
            with self.lock:
                if doc is not None:
                    self.doc, self.fetched = doc, time.time()
                self.error = error
                self.version += 1
            self._wake.wait(self.interval)
            self._wake.clear()


# ----------------------------------------------------------------------------- curses


class _Screen:
    """The interactive loop (curses.wrapper calls run)."""

    def __init__(self, address: str, view: View, fetcher: Fetcher, timeout: float) -> None:
        self.address, self.view, self.fetcher, self.timeout = address, view, fetcher, timeout
        self.mode = "normal"        # or "filter", "confirm"
        self.edit = ""
        self.saved_filter = ""
        self.confirm_row: dict | None = None
        self.top = 0                # first row shown

    def run(self, stdscr: Any) -> None:
        import curses

        self.curses = curses
        self.scr = stdscr
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        stdscr.timeout(100)
        stdscr.keypad(True)
        seen = -1
        dirty = True
        last_draw = 0.0
        while True:
            version, doc, error, fetched = self.fetcher.snapshot()
            if version != seen:
                seen = version
                self.view.update(doc, error, fetched)
                dirty = True
            if dirty or time.monotonic() - last_draw >= 1.0:
                self.draw()
                dirty, last_draw = False, time.monotonic()
            try:
                key = stdscr.get_wch()
            except curses.error:
                continue  # no key within 100 ms
            dirty = True
            if not self.key(key):
                return

    # --- keys

    def key(self, k: Any) -> bool:
        """Handle one key; False to quit."""
        c = self.curses
        if k == c.KEY_RESIZE:
            return True
        if self.mode == "filter":
            self._filter_key(k)
            return True
        if self.mode == "confirm":
            self._confirm_key(k)
            return True
        v = self.view
        page = max(self._table_height() - 1, 1)
        if k in ("q", "Q"):
            return False
        self.view.message = ""
        if k == "s":
            v.cycle_sort(1)
        elif k == "S":
            v.cycle_sort(-1)
        elif k == "r":
            v.toggle_reverse()
        elif k == "/":
            self.mode, self.saved_filter, self.edit = "filter", v.filter, v.filter
        elif k == "\x1b":
            v.set_filter("")
        elif k in (c.KEY_DOWN, "j"):
            v.move(1)
        elif k in (c.KEY_UP, "k"):
            v.move(-1)
        elif k == c.KEY_NPAGE:
            v.move(page)
        elif k == c.KEY_PPAGE:
            v.move(-page)
        elif k in (c.KEY_HOME, "g"):
            v.select(0)
        elif k in (c.KEY_END, "G"):
            v.select(len(v.rows) - 1)
        elif k == "d":
            row = v.selected_row()
            if row is None:
                v.message = "no session selected"
            else:
                self.mode, self.confirm_row = "confirm", row
        elif k in ("\x0c",):  # ^L: redraw everything
            self.scr.clear()
            self.fetcher.refresh()
        return True

    def _filter_key(self, k: Any) -> None:
        c = self.curses
        if k in ("\n", "\r", c.KEY_ENTER):
            self.mode = "normal"
            self.view.set_filter(self.edit)
            return
        if k == "\x1b":
            self.mode = "normal"
            self.view.set_filter(self.saved_filter)
            return
        if k in (c.KEY_BACKSPACE, "\x7f", "\x08"):
            self.edit = self.edit[:-1]
        elif k == "\x15":  # ^U
            self.edit = ""
        elif isinstance(k, str) and k.isprintable() and len(self.edit) < 256:
            self.edit += k
        else:
            return
        self.view.set_filter(self.edit)  # the table follows the typing

    def _confirm_key(self, k: Any) -> None:
        from .admin import AdminError, request_disconnect

        row, self.mode, self.confirm_row = self.confirm_row, "normal", None
        if k not in ("y", "Y") or row is None:
            self.view.message = "not disconnected"
            return
        cid = row.get("client_id")
        addr = (str(row.get("addr")), int(row.get("port") or 0))
        self.view.message = f"disconnecting {remote_of(row)} ..."
        self.draw()
        try:
            n = request_disconnect(self.address, client_id=cid if isinstance(cid, str) else None, addr=addr,
                                   timeout=self.timeout)
        except AdminError as e:
            self.view.message = f"disconnect failed: {e}"
            return
        self.view.message = (f"disconnected {remote_of(row)}" if n else
                             f"{remote_of(row)}: no such session any more")
        self.fetcher.refresh()

    # --- drawing

    def _table_height(self) -> int:
        h, _ = self.scr.getmaxyx()
        return h - 4

    def put(self, y: int, x: int, text: str, attr: int = 0) -> None:
        h, w = self.scr.getmaxyx()
        if 0 <= y < h and x < w:
            try:
                self.scr.addnstr(y, x, text, w - x, attr)
            except self.curses.error:
                pass  # the bottom-right cell: written, then the cursor cannot advance

    def draw(self) -> None:
        c, scr, v = self.curses, self.scr, self.view
        scr.erase()
        h, w = scr.getmaxyx()
        if w < MIN_WIDTH or h < MIN_HEIGHT:
            msg = f"terminal too small: {w}x{h}, need {MIN_WIDTH}x{MIN_HEIGHT} (q quits)"
            for i in range(0, min(len(msg), w * h), max(w, 1)):
                self.put(i // max(w, 1), 0, msg[i:i + w])
            scr.refresh()
            return
        clock = time.strftime("%H:%M:%S")
        self.put(0, 0, _fit(f"fastproxy top - {self.address} - {v.summary()}", w - len(clock) - 1))
        self.put(0, w - len(clock), clock)
        if v.error:
            stale = f" (table from {time.strftime('%H:%M:%S', time.localtime(v.fetched))})" if v.doc else ""
            self.put(1, 0, f"{v.error}; retrying every {self.fetcher.interval:g}s{stale}", c.A_BOLD)
        else:
            self.put(1, 0, f"{v.settings()} | s sort  r reverse  / filter  d disconnect  q quit")
        head, lines = v.table(w)
        self.put(2, 0, head.ljust(w), c.A_REVERSE)
        rows_h = self._table_height()
        if v.selected < self.top:
            self.top = v.selected
        elif v.selected >= self.top + rows_h:
            self.top = v.selected - rows_h + 1
        self.top = max(0, min(self.top, max(len(lines) - rows_h, 0)))
        for i, line in enumerate(lines[self.top:self.top + rows_h]):
            selected = self.top + i == v.selected
            self.put(3 + i, 0, line.ljust(w) if selected else line, c.A_REVERSE if selected else 0)
        if not lines:
            self.put(3, 0, "(no sessions match the filter)" if v.filter and v.doc else
                     "(no sessions)" if v.doc else "(waiting for the proxy)")
        if self.mode == "filter":
            prompt = f"filter ClientId (Enter keeps, Esc cancels): {self.edit}"
            self.put(h - 1, 0, prompt)
            try:
                c.curs_set(1)
                scr.move(h - 1, min(len(prompt), w - 1))
            except c.error:
                pass
        else:
            try:
                c.curs_set(0)
            except c.error:
                pass
            if self.mode == "confirm" and self.confirm_row is not None:
                r = self.confirm_row
                self.put(h - 1, 0, f"disconnect {_text(r.get('client_id'))} at {remote_of(r)} "
                                   f"(pid {r.get('pid')})? y/n", c.A_BOLD)
            elif v.message:
                self.put(h - 1, 0, v.message, c.A_BOLD)
        scr.refresh()


# ----------------------------------------------------------------------------- the command


def top_command(address: str, *, interval: float = 1.0, once: bool = False, limit: int = SESSIONS_LIMIT,
                sort: str = "client_id", reverse: bool = False, filter: str = "", timeout: float = 5.0,
                out: TextIO | None = None) -> int:
    """`fastproxy top`: 0 when it ends normally; 1 if --once could not reach the proxy."""
    from .admin import AdminError, fetch_sessions

    out = sys.stdout if out is None else out
    view = View(sort=sort, reverse=reverse, filter=filter)
    if once or not out.isatty():
        try:
            doc = fetch_sessions(address, limit=limit, timeout=timeout)
        except AdminError as e:
            print(f"fastproxy top: {e}", file=sys.stderr)
            return 1
        view.update(doc, None)
        out.write(render_text(view, address))
        out.flush()
        return 0
    import curses
    import locale

    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")  # Esc alone is not the start of a key sequence
    fetcher = Fetcher(address, interval, limit, timeout).start()
    try:
        curses.wrapper(_Screen(address, view, fetcher, timeout).run)
    except KeyboardInterrupt:
        pass
    finally:
        fetcher.stop()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `fastproxy top` (cli.py's parser)."""
    p.add_argument("--admin", metavar="ADDR", help="the proxy's admin address (default 127.0.0.1:8404, or the file's)")
    p.add_argument("-c", "--config", metavar="FILE", help="read the admin address from this configuration file")
    p.add_argument("--interval", metavar="SECONDS", type=float, default=1.0, help="refresh this often (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print the table once as text and exit (also what happens without a terminal)")
    p.add_argument("--sort", choices=SORT_KEYS, default="client_id", help="sort column (default client_id)")
    p.add_argument("--reverse", action="store_true", help="sort in descending order")
    p.add_argument("--filter", metavar="TEXT", default="", help="only ClientIds containing TEXT (case-insensitive)")
    p.add_argument("--limit", metavar="N", type=int, default=SESSIONS_LIMIT,
                   help=f"ask for at most N sessions (default {SESSIONS_LIMIT}, at most {SESSIONS_MAX})")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0,
                   help="give up on one request after this long (default 5)")


def run(ns: argparse.Namespace) -> int:
    """`fastproxy top` from cli.py's parsed arguments."""
    from .cli import admin_address

    address, code = admin_address(ns, "top")
    if address is None:
        return code
    if not ns.interval > 0 or not ns.timeout > 0:
        print("fastproxy top: --interval and --timeout must be more than 0", file=sys.stderr)
        return 2
    if not 0 <= ns.limit <= SESSIONS_MAX:
        print(f"fastproxy top: --limit must be 0 to {SESSIONS_MAX}", file=sys.stderr)
        return 2
    return top_command(address, interval=ns.interval, once=ns.once, limit=ns.limit,
                       sort=ns.sort, reverse=ns.reverse, filter=ns.filter, timeout=ns.timeout)
