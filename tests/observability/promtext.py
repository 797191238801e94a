"""Scrape helpers: a real HTTP GET and prometheus_client's own text parser."""

from __future__ import annotations

import gzip
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def parse(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} for every sample in the exposition."""
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, hdrs, body = scrape(f"{base}/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200, body
    if hdrs.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return parse(body)


def value(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    want = tuple(sorted(labels.items()))
    return m.get((name, want))


def series(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[tuple[tuple[str, str], ...], float]:
    return {k[1]: v for k, v in m.items() if k[0] == name}
