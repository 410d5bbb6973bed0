"""The soak benchmark, short and bounded: the session's `serve`, 40 requests at concurrency 8 of short
and long speech and bad inputs; every one answered as expected, memory sampled throughout."""

import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.triton

sys.path.insert(0, str(ROOT / "bench"))
import soak  # noqa: E402  (bench/ is not a package)


def test_short_soak_loses_nothing(serve, tmp_path):
    report = soak.run(40, 8, serve.url, serve.process.pid, long_fraction=0.1, bad_fraction=0.3, long_sentences=6)
    assert report.failures == 0, report.failure_details
    assert report.refused_busy == 0  # far under the default bound
    assert set(report.latency_s) >= {"short", "bad"} and report.latency_s["short"]["n"] > 0
    assert len(report.rss_mb) >= 3 and all(mb > 100 for _, mb in report.rss_mb[1:])  # the whole tree, not the proxy
    soak.plot(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 0
