"""`gpuflow notebook` opens a browser only for a person at a desktop: a terminal with a display, never under CI,
GPUFLOW_NO_BROWSER, a pipe (tests) or a headless Linux."""

from __future__ import annotations

import sys
import webbrowser

import pytest

from gpuflow.cli.tunnels import _open_browser

URL = "http://127.0.0.1:8888/tree?token=abc"


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def opened(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *args, **kwargs: calls.append(url) or True)
    for name in ("CI", "GPUFLOW_NO_BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    return calls


@pytest.mark.parametrize(
    ("tty", "environment", "expected"),
    [
        (True, {"DISPLAY": ":0"}, [URL]),
        (True, {"WAYLAND_DISPLAY": "wayland-0"}, [URL]),
        (True, {}, []),  # headless Linux (an SSH session to a server): no browser to open
        (False, {"DISPLAY": ":0"}, []),  # output piped (a test, a script)
        (True, {"DISPLAY": ":0", "CI": "true"}, []),
        (True, {"DISPLAY": ":0", "GPUFLOW_NO_BROWSER": "1"}, []),
    ],
    ids=["display", "wayland", "headless", "piped", "ci", "opted-out"],
)
def test_a_browser_opens_only_at_a_desktop(opened, monkeypatch, tty, environment, expected):
    monkeypatch.setattr(sys, "stdout", _Terminal(tty))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    _open_browser(URL)
    assert opened == expected


def test_a_browser_that_cannot_start_is_no_error(opened, monkeypatch):
    def fail(url, *args, **kwargs):
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "open", fail)
    monkeypatch.setattr(sys, "stdout", _Terminal(True))
    monkeypatch.setenv("DISPLAY", ":0")
    _open_browser(URL)  # the URL is printed already: nothing more to do
