"""The soak's arithmetic and its files: the slope that says "bounded", and charts a browser opens."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.soak import Sample, lag_summary, slope, write_results


def test_the_slope_of_a_line_is_its_gradient_and_of_a_flat_series_zero() -> None:
    assert slope([(0, 1), (1, 3), (2, 5), (3, 7)]) == pytest.approx(2.0)
    assert slope([(0, 4), (1, 4), (2, 4)]) == 0.0
    assert slope([(5, 1)]) == 0.0
    # Noise around a flat line: no trend.
    assert abs(slope([(0, 10), (1, 12), (2, 8), (3, 11), (4, 9)])) < 0.5


def test_results_are_written_as_json_and_two_charts_with_names_escaped(tmp_path: Path) -> None:
    samples = [
        Sample(
            t_s=30.0 * i, events=1000 * i, events_per_s=33.3, lag_s={"relay": 0.1 * i}, rss_mb={"<x&y>": 50.0}
        )
        for i in range(1, 5)
    ]
    write_results(tmp_path / "soak-10-2m", samples, {"rate": 10.0, "minutes": 2})
    data = json.loads((tmp_path / "soak-10-2m.json").read_text())
    assert data["summary"]["rate"] == 10.0
    assert [s["events"] for s in data["samples"]] == [1000, 2000, 3000, 4000]
    for chart in ("soak-10-2m-lag.svg", "soak-10-2m-rss.svg"):
        root = ET.fromstring((tmp_path / chart).read_text())  # well-formed: names are escaped
        assert root.tag.endswith("svg")
        assert root.findall(".//{http://www.w3.org/2000/svg}polyline"), chart
    assert "&lt;x&amp;y&gt;" in (tmp_path / "soak-10-2m-rss.svg").read_text()


def test_the_readers_lag_and_the_ingesters_behind_the_feed_are_told_apart() -> None:
    steady = [
        Sample(
            t_s=30.0 * i,
            events=0,
            events_per_s=0,
            lag_s={"relay": 0.2 * i, "projector-pnl": 0.1, "ingester": f},
        )
        for i, f in enumerate([3.0, 6.5, 4.0, 5.5, 2.0], 1)
    ]
    lags = lag_summary(steady)
    assert lags["worst_reader_lag_s"] == pytest.approx(1.0)  # the relay's, not the ingester's 6.5
    assert (lags["feed_lag_worst_s"], lags["feed_lag_median_s"]) == (6.5, 4.0)
    assert lags["feed_lag_samples_over"] == 2
    assert lags["samples"] == 5
