"""A logged-in HTTP client of the console (requests, cookies kept), for the console tests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import requests

_HIDDEN = re.compile(r'name="(csrf|nonce)" value="([^"]*)"')


def hidden(html: str, name: str) -> str:
    for found, value in _HIDDEN.findall(html):
        if found == name:
            return str(value)
    raise AssertionError(f"no {name} in the page")


@dataclass
class ConsoleClient:
    base: str  # http://127.0.0.1:PORT
    http: requests.Session = field(default_factory=requests.Session)
    seen: list[str] = field(default_factory=list)
    csrf: str = ""

    def get(self, path: str, **kw: Any) -> requests.Response:
        answer = self.http.get(self.base + path, allow_redirects=False, timeout=30, **kw)
        self.seen.append(answer.text)
        return answer

    def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: bool = True,
             **kw: Any) -> requests.Response:  # fmt: skip
        form = dict(data or {})
        if csrf:
            form.setdefault("csrf", self.csrf)
        answer = self.http.post(self.base + path, data=form, allow_redirects=False, timeout=60,
                                **kw)  # fmt: skip
        self.seen.append(answer.text)
        return answer

    def login(self, token: str) -> requests.Response:
        page = self.get("/console/login")
        answer = self.post("/console/login", {"token": token, "nonce": hidden(page.text, "nonce")},
                           csrf=False)  # fmt: skip
        if answer.status_code == 303:
            self.csrf = hidden(self.get("/console/").text, "csrf")
        return answer

    def follow(self, answer: requests.Response) -> requests.Response:
        assert answer.status_code == 303, (answer.status_code, answer.text[:300])
        return self.get(answer.headers["location"])
