#!/usr/bin/env python3
"""Browser check of the booking service's dashboard, in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`,
as Puppeteer does), so nothing but the Python standard library and Debian's
`chromium` is needed: no WebDriver, no npm, no network.

The service must already run, with the sagas named on the command line made:

    python3 dashboard_test.py --url http://127.0.0.1:10090/ --token s3cret \\
        --completed ok-1 --compensated fault-1 --screenshot target/dashboard.png

It opens the page, gives the token when asked, finds every booking flow drawn
with its nodes and compensations, the live counts and the recent sagas, retries
a stuck saga from its page (with `--stuck`), searches the compensated saga and
finds its timeline with the rollback reason, and saves a screenshot. Given the
options for them, it also types an operator name, aborts a running saga, settles a
stuck one by hand, redrives stuck sagas after a dry-run count and pauses a facade. Exits 0 when every check passes; prints `dashboard: N passed, M failed` last.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

FLOWS = ("AsyncBooking", "SyncBooking", "ThrottlingBooking")
NODES = ("CreateOrder", "CreatePayment")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


class CheckFailed(Exception):
    """A check's expectation did not hold."""


class Browser:
    """One headless Chromium and one page in it, over the DevTools pipe."""

    def __init__(self, chromium: str, width: int, height: int, timeout: float) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="sagaflow-chromium-")
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        # Chromium reads commands from fd 3 and writes replies to fd 4.
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Out of the way of 3 and 4, so the dup2s in the child cannot clobber each other.
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire_pipes() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            pass_fds=(3, 4),
            preexec_fn=wire_pipes,  # noqa: PLW1509 - single-threaded here
        )
        os.close(child_r)
        os.close(child_w)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            written = os.write(self._to_chrome, data)
            data = data[written:]

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise CheckFailed(f"Chromium closed the DevTools pipe:\n{self.output()}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Sends one command and returns its result; events met meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CheckFailed(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in result:
            raise CheckFailed(f"script failed: {result['exceptionDetails']}\n  in: {expression}")
        return result["result"].get("value")

    def wait_for(self, what: str, expression: str, timeout: float = 15.0) -> Any:
        """Polls `expression` until it is truthy; fails naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except CheckFailed as error:  # the page may not be there yet
                last = error
            else:
                if last:
                    return last
            time.sleep(0.1)
        raise CheckFailed(f"timed out waiting for {what} (last value: {last!r})")

    def navigate(self, url: str) -> None:
        """Opens `url` and waits until the page and its scripts are loaded."""
        result = self.call("Page.navigate", {"url": url}, session=True)
        if result.get("errorText"):
            raise CheckFailed(f"navigating to {url}: {result['errorText']}")
        self.wait_for(
            f"{url} to load",
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
        )

    def type_into(self, selector: str, text: str) -> None:
        """Focuses the element and types `text` as keyboard input would."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text}, session=True)

    def click(self, selector: str) -> None:
        """Clicks the element with the mouse, at its centre (scrolled into the window first)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
                session=True,
            )

    def screenshot(self, path: str) -> None:
        """Saves the whole page as PNG."""
        metrics = self.call("Page.getLayoutMetrics", session=True)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
            session=True,
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as out:
            out.write(base64.b64decode(shot["data"]))

    def page_errors(self) -> list[str]:
        """Uncaught exceptions, console errors and refused loads (CSP) seen so far."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                if entry.get("source") == "network" and "status of 401" in entry.get("text", ""):
                    continue  # how the page learns it needs the token
                errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        return errors

    def output(self) -> str:
        """The tail of Chromium's own output, without its complaints about the absent D-Bus."""
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        return "\n".join(line for line in lines if "dbus" not in line)[-4000:]

    def close(self) -> None:
        try:
            self._send({"id": self._next_id + 1, "method": "Browser.close", "params": {}})
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)


def texts(selector: str) -> str:
    """JS: the text of every element matching `selector`, as a JSON array."""
    return f"Array.from(document.querySelectorAll({json.dumps(selector)}), e => e.textContent)"


def check_token_prompt(browser: Browser, args: argparse.Namespace) -> None:
    if args.token:
        browser.wait_for("the token form", "!document.getElementById('token-form').hidden")
        if not browser.evaluate("document.getElementById('main').hidden"):
            raise CheckFailed("the dashboard showed its data before a token was given")
        browser.type_into("#token-input", args.token)
        browser.click("#token-submit")
    browser.wait_for("the dashboard", "!document.getElementById('main').hidden")
    stored = browser.evaluate("sessionStorage.getItem('sagaflow.adminToken')")
    if stored != (args.token or None):
        raise CheckFailed(f"token in session storage is {stored!r}")


def check_flows(browser: Browser, _args: argparse.Namespace) -> None:
    drawn = browser.wait_for(
        "three flow diagrams",
        "(() => { const s = document.querySelectorAll('#flows svg[data-facade]');"
        " return s.length >= 3 && Array.from(s, e => e.dataset.facade); })()",
    )
    if sorted(drawn) != sorted(FLOWS):
        raise CheckFailed(f"flows drawn: {drawn}")
    for facade in FLOWS:
        svg = f'#flows svg[data-facade="{facade}"]'
        nodes = browser.evaluate(texts(f"{svg} g.node text.name"))
        comps = browser.evaluate(texts(f"{svg} g.comp text.name"))
        if nodes != list(NODES):
            raise CheckFailed(f"{facade}: nodes drawn {nodes}, expected {list(NODES)} in order")
        if comps != list(NODES):
            raise CheckFailed(f"{facade}: compensations drawn {comps}")
        edges = browser.evaluate(f"document.querySelectorAll('{svg} line.edge').length")
        # start→2 nodes→completed (3), a failure edge per node (2), a rollback per compensation (2)
        if edges != 7:
            raise CheckFailed(f"{facade}: {edges} arrows drawn, expected 7")


def check_counts(browser: Browser, _args: argparse.Namespace) -> None:
    browser.wait_for(
        "counts of completed and compensated sagas",
        "(() => { const n = id => Number((document.getElementById(id) || {}).textContent);"
        " return n('count-completed') >= 1 && n('count-compensated') >= 1; })()",
    )
    row = browser.evaluate(texts('#facade-counts tr[data-facade="SyncBooking"] td'))
    if not row or int(row[3]) < 1:
        raise CheckFailed(f"SyncBooking counts row: {row}")
    live = browser.evaluate("document.getElementById('live').textContent")
    if not live.startswith("live"):
        raise CheckFailed(f"live indicator says {live!r}")


def check_recent(browser: Browser, args: argparse.Namespace) -> None:
    ids = json.dumps([args.completed, args.compensated])
    browser.wait_for(
        "both sagas in the recent list",
        f"{ids}.every(id => Array.from(document.querySelectorAll('#recent tbody tr'))"
        " .some(r => r.dataset.requestId === id))",
    )
    browser.evaluate(
        "(() => { const s = document.getElementById('status-filter'); s.value = 'compensated';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    browser.wait_for(
        "the status filter to keep only compensated sagas",
        "(() => { const rows = Array.from(document.querySelectorAll('#recent tbody tr[data-request-id]'));"
        f" return rows.length > 0 && rows.every(r => r.className === 'row-compensated')"
        f" && rows.some(r => r.dataset.requestId === {json.dumps(args.compensated)}); }})()",
    )
    browser.evaluate(
        "(() => { const s = document.getElementById('status-filter'); s.value = '';"
        " s.dispatchEvent(new Event('change')); })()"
    )


def check_search(browser: Browser, args: argparse.Namespace) -> None:
    browser.evaluate("document.getElementById('search-input').value = ''")
    browser.type_into("#search-input", args.compensated)
    browser.click("#search-submit")
    browser.wait_for(
        "the compensated saga's timeline",
        f"(document.querySelector('.saga-head') || {{dataset: {{}}}}).dataset.requestId === {json.dumps(args.compensated)}"
        " && document.querySelectorAll('#saga-timeline li').length >= 5",
    )
    reason = browser.evaluate("(document.getElementById('rollback-reason') || {}).textContent")
    if not reason or "CreatePayment" not in reason or "fault injected" not in reason:
        raise CheckFailed(f"rollback reason shown: {reason!r}")
    entries = browser.evaluate(
        "Array.from(document.querySelectorAll('#saga-timeline li'), li =>"
        " [li.dataset.event, li.dataset.node, li.classList.contains('rollback')])"
    )
    events = [e[0] for e in entries]
    expected = ["started", "step_started", "step_completed", "step_started", "step_failed", "step_compensated"]
    if events[: len(expected)] != expected:
        raise CheckFailed(f"timeline events {events}")
    failed = [e for e in entries if e[0] == "step_failed"]
    if failed != [["step_failed", "CreatePayment", True]]:
        raise CheckFailed(f"the failed step is shown as {failed}")
    if ["step_compensated", "CreateOrder", False] not in entries:
        raise CheckFailed(f"no compensation of CreateOrder in {entries}")
    error = browser.evaluate("document.querySelector('#saga-timeline li.rollback .error').textContent")
    if "fault injected" not in error:
        raise CheckFailed(f"the failed step's error reads {error!r}")
    marks = browser.evaluate(
        "Array.from(document.querySelectorAll('#saga svg g.box'), g => g.getAttribute('class'))"
    )
    if not any("failed" in m for m in marks) or not any("compensated" in m for m in marks):
        raise CheckFailed(f"the saga's path is not marked on its flow: {marks}")


def check_retry(browser: Browser, args: argparse.Namespace) -> None:
    if not args.stuck:
        return
    browser.evaluate("document.getElementById('search-input').value = ''")
    browser.type_into("#search-input", args.stuck)
    browser.click("#search-submit")
    browser.wait_for(
        "the stuck saga with its reason and a retry button",
        "(document.getElementById('stuck-reason') || {}).textContent"
        f" && document.querySelector('.saga-head').dataset.requestId === {json.dumps(args.stuck)}"
        " && !!document.getElementById('retry-button')",
    )
    reason = browser.evaluate("document.getElementById('stuck-reason').textContent")
    if "gave up" not in reason:
        raise CheckFailed(f"stuck reason shown: {reason!r}")
    browser.click("#retry-button")
    browser.wait_for(
        "the retried saga to end compensated",
        "(document.querySelector('.saga-head .badge') || {}).textContent === 'compensated'"
        " && Array.from(document.querySelectorAll('#saga-timeline li'), li => li.dataset.event)"
        " .includes('retry_compensation')",
    )
    browser.evaluate("document.getElementById('search-input').value = ''")


def show_saga(browser: Browser, request_id: str, what: str, condition: str) -> None:
    """Searches `request_id` and waits until its view satisfies the JS `condition`."""
    browser.evaluate("document.getElementById('search-input').value = ''")
    browser.type_into("#search-input", request_id)
    browser.click("#search-submit")
    browser.wait_for(
        what,
        f"(document.querySelector('.saga-head') || {{dataset: {{}}}}).dataset.requestId === {json.dumps(request_id)}"
        f" && ({condition})",
    )


def badge_is(*statuses: str) -> str:
    """JS: whether the shown saga's status badge is one of `statuses`."""
    return f"{json.dumps(list(statuses))}.includes((document.querySelector('.saga-head .badge') || {{}}).textContent)"


def timeline_has(event: str) -> str:
    """JS: whether the shown saga's timeline has `event`."""
    return (
        "Array.from(document.querySelectorAll('#saga-timeline li'), li => li.dataset.event)"
        f".includes({json.dumps(event)})"
    )


def check_operator(browser: Browser, args: argparse.Namespace) -> None:
    if not args.operator:
        return
    browser.type_into("#operator-name", args.operator)
    stored = browser.evaluate("sessionStorage.getItem('sagaflow.operator')")
    if stored != args.operator:
        raise CheckFailed(f"operator name in session storage is {stored!r}")


def check_abort(browser: Browser, args: argparse.Namespace) -> None:
    if not args.running:
        return
    show_saga(browser, args.running, "the running saga with an abort button",
              f"{badge_is('running')} && !!document.getElementById('abort-button')")
    # Without a reason nothing is sent.
    browser.click("#abort-button")
    browser.wait_for("the page to ask for a reason",
                     "(document.getElementById('action-refused') || {}).textContent.includes('reason')")
    if browser.evaluate(badge_is("running")) is not True:
        raise CheckFailed("the saga changed without a reason given")
    browser.type_into("#abort-reason", "the customer cancelled in the browser")
    browser.click("#abort-button")
    browser.wait_for("the aborted saga to roll back", f"{badge_is('compensating', 'compensated')} && {timeline_has('aborted')}")
    reason = browser.evaluate("(document.getElementById('rollback-reason') || {}).textContent")
    if not reason or f"aborted by {args.operator or 'admin'}" not in reason:
        raise CheckFailed(f"rollback reason shown: {reason!r}")


def check_resolve(browser: Browser, args: argparse.Namespace) -> None:
    if not args.resolve:
        return
    show_saga(browser, args.resolve, "the stuck saga with a resolve button",
              f"{badge_is('stuck')} && !!document.getElementById('resolve-button')")
    label = browser.evaluate("document.getElementById('resolve-button').textContent")
    if "CreateOrder" not in label:
        raise CheckFailed(f"the resolve button reads {label!r}")
    browser.type_into("#resolve-reason", "order voided in the browser")
    browser.click("#resolve-button")
    browser.wait_for("the resolved saga to end compensated", f"{badge_is('compensated')} && {timeline_has('resolved')}")


def check_redrive(browser: Browser, args: argparse.Namespace) -> None:
    if not args.redrive_facade:
        return
    browser.evaluate(
        "(() => { const s = document.getElementById('redrive-facade');"
        f" s.value = {json.dumps(args.redrive_facade)}; s.dispatchEvent(new Event('change')); }})()"
    )
    browser.click("#redrive-count")
    count = args.redrive_count
    result = browser.wait_for(
        "the dry run's count",
        f"(() => {{ const r = document.getElementById('redrive-result');"
        f" return r.dataset.matched === '{count}' && r.textContent; }})()",
    )
    if result != f"{count} stuck sagas match":
        raise CheckFailed(f"the dry run says {result!r}")
    label = browser.evaluate("document.getElementById('redrive-run').textContent")
    if label != f"redrive {count}":
        raise CheckFailed(f"the redrive button reads {label!r}")
    browser.click("#redrive-run")
    browser.wait_for(
        "the redrive's answer",
        f"document.getElementById('redrive-result').textContent === '{count} stuck sagas retried'",
    )


def check_pause(browser: Browser, args: argparse.Namespace) -> None:
    if not args.pause:
        return
    figure = f"document.querySelector('#flows figure[data-facade=\"{args.pause}\"]')"
    button = f'#flows button.pause-button[data-facade="{args.pause}"]'
    for action, paused in (("pause", True), ("resume", False), ("pause", True)):
        label = browser.evaluate(f"document.querySelector({json.dumps(button)}).textContent")
        if label != action:
            raise CheckFailed(f"{args.pause}'s button reads {label!r}, expected {action!r}")
        browser.click(button)
        state = "paused" if paused else "taking calls"
        browser.wait_for(
            f"{args.pause} to show {state}",
            f"{figure}.classList.contains('paused') === {json.dumps(paused)}"
            f" && document.querySelector({json.dumps(button)}).textContent === {json.dumps('resume' if paused else 'pause')}",
        )


def check_no_page_errors(browser: Browser, _args: argparse.Namespace) -> None:
    errors = browser.page_errors()
    if errors:
        raise CheckFailed("errors in the page:\n  " + "\n  ".join(errors))


def find_chromium(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the dashboard's URL, e.g. http://127.0.0.1:10090/")
    parser.add_argument("--token", default="", help="the admin token, when the service has one")
    parser.add_argument("--completed", required=True, help="request id of a completed saga")
    parser.add_argument("--compensated", required=True, help="request id of a compensated (fault-injected) saga")
    parser.add_argument("--stuck", default="", help="request id of a stuck saga whose upstream has healed")
    parser.add_argument("--operator", default="", help="the operator name to type into the page")
    parser.add_argument("--running", default="", help="request id of a saga held in a slow step, to abort")
    parser.add_argument("--resolve", default="", help="request id of a stuck saga to settle by hand")
    parser.add_argument("--redrive-facade", default="", help="facade whose stuck sagas to redrive")
    parser.add_argument("--redrive-count", type=int, default=0, help="how many stuck sagas the dry run must count")
    parser.add_argument("--pause", default="", help="a facade to pause, resume and pause again")
    parser.add_argument("--screenshot", required=True, help="where to save the PNG")
    parser.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, else chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per DevTools call")
    parser.add_argument("--deadline", type=int, default=120, help="seconds for the whole check")
    args = parser.parse_args()

    def out_of_time(_signum: int, _frame: Any) -> None:
        raise CheckFailed(f"the whole check took more than {args.deadline} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(args.deadline)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("dashboard: chromium not found (scripts/install-browser.sh installs it)", file=sys.stderr)
        return 2
    browser = Browser(chromium, width=1440, height=1000, timeout=args.timeout)
    checks: list[tuple[str, Callable[[Browser, argparse.Namespace], None]]] = [
        ("the page opens, asking for the token when there is one", check_token_prompt),
        ("the operator's name is kept for the tab", check_operator),
        ("a running saga is aborted with a reason", check_abort),
        ("every booking flow is drawn with its nodes and compensations", check_flows),
        ("live counts per outcome", check_counts),
        ("recent sagas, filtered by status", check_recent),
        ("a stuck saga shows why, and its retry button compensates it", check_retry),
        ("a stuck compensation is settled by hand with a reason", check_resolve),
        ("a redrive counts the stuck sagas, then retries them", check_redrive),
        ("a facade is paused, resumed and paused again", check_pause),
        ("search by request id shows the timeline and rollback reason", check_search),
        ("no script error, console error or refused load", check_no_page_errors),
    ]
    passed = failed = 0
    try:
        browser.navigate(args.url)
        for name, check in checks:
            try:
                check(browser, args)
            except CheckFailed as error:
                failed += 1
                print(f"FAIL {name}: {error}")
                break  # later checks build on this one
            passed += 1
            print(f"ok   {name}")
        browser.screenshot(args.screenshot)
        print(f"screenshot: {args.screenshot}")
    except CheckFailed as error:
        failed += 1
        print(f"FAIL driving Chromium: {error}")
    finally:
        signal.alarm(0)
        browser.close()
    if failed:
        print("--- chromium output (tail)\n" + browser.output())
    print(f"dashboard: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
