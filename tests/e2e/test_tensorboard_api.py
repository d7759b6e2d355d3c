"""The real TensorBoard serves a probe run's scalars, histograms, images and anomaly text.

Each test runs against both of TensorBoard's readers: the Rust data server (the default behind
``tensorboard --logdir``) and the Python one (``--load_fast=false``).
"""

from __future__ import annotations

import html

import numpy as np

from tests.e2e.conftest import RUN, RUNS
from tests.e2e.probe_run import decode_png, spec_from_events, write_probe_run

PLUGINS_WITH_DATA = ("scalars", "histograms", "distributions", "images", "text")


def _markdown_table_cells(markdown: str) -> list[str]:
    """Every cell of every markdown table row in ``markdown`` (separator rows skipped)."""
    cells = []
    for line in markdown.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        row = [c.strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in row):
            continue
        cells.extend(row)
    return cells


def test_runs_and_plugins_listed(tensorboard, probe_run):
    """/data/runs lists the demo's runs; the scalar, histogram, image and text plugins are
    active."""
    assert sorted(tensorboard.get_json("/data/runs")) == RUNS
    listing = tensorboard.get_json("/data/plugins_listing")
    for plugin in PLUGINS_WITH_DATA:
        assert listing[plugin]["enabled"] is True, plugin
    for plugin in ("audio", "pr_curves", "mesh"):
        assert listing[plugin]["enabled"] is False, plugin


def test_scalars_served_with_values(tensorboard, probe_run):
    """Every scalar tag is listed, and its (step, value) series is served exactly (float32)."""
    _, spec = probe_run
    tags = tensorboard.get_json("/data/plugin/scalars/tags")[RUN]
    assert set(tags) == set(spec.scalars)
    for tag, expected in spec.scalars.items():
        served = tensorboard.get_json("/data/plugin/scalars/scalars", run=RUN, tag=tag)
        assert [step for _, step, _ in served] == [step for step, _ in expected], tag
        got = np.array([value for _, _, value in served], dtype=np.float32)
        want = np.array([value for _, value in expected], dtype=np.float32)
        np.testing.assert_array_equal(got, want, err_msg=tag)


def test_grad_norm_explosion_visible(tensorboard, probe_run):
    """The served grad_norm/_total jumps more than 50x where the anomaly report puts the first
    spike (the demo's fine-tune at a too-high learning rate): at that step, or the next one
    when the spike was found in the update the step made."""
    _, spec = probe_run
    spikes = [(s, md) for s, md in spec.texts["anomaly/text_summary"] if "| spike |" in md]
    assert spikes, spec.texts["anomaly/text_summary"]
    first, markdown = spikes[0]
    served = tensorboard.get_json("/data/plugin/scalars/scalars", run=RUN, tag="grad_norm/_total")
    ratios = [b[2] / a[2] for a, b in zip(served, served[1:], strict=False)]
    jump = int(np.argmax(ratios)) + 1
    assert ratios[jump - 1] > 50
    assert served[jump][1] in (first, first + 1), (served[jump][1], markdown)


def test_histograms_served_with_buckets(tensorboard, probe_run):
    """Histogram tags are listed and each step's (left, right, count) buckets are served."""
    _, spec = probe_run
    tags = tensorboard.get_json("/data/plugin/histograms/tags")[RUN]
    assert set(tags) == set(spec.histograms)
    for tag, expected in spec.histograms.items():
        served = tensorboard.get_json("/data/plugin/histograms/histograms", run=RUN, tag=tag)
        assert [step for _, step, _ in served] == [step for step, _ in expected], tag
        for (_, step, buckets), (_, histo) in zip(served, expected, strict=True):
            got = np.array(buckets, dtype=np.float64).reshape(-1, 3)
            want = histo.served(tensorboard.reader)
            assert got.shape == want.shape, (tag, step)
            np.testing.assert_array_equal(got[:, 2], want[:, 2], err_msg=f"{tag}@{step}")
            # the Python reader serves float32 edges, the Rust one float64
            np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=1e-6, err_msg=f"{tag}@{step}")
            assert got[:, 2].sum() == histo.counts.sum() > 0


def test_images_served_as_pngs(tensorboard, probe_run):
    """Image tags are listed; each step's individualImage decodes to the written pixels."""
    _, spec = probe_run
    tags = tensorboard.get_json("/data/plugin/images/tags")[RUN]
    assert set(tags) == set(spec.images)
    for tag, expected in spec.images.items():
        assert tags[tag]["samples"] == 1
        served = tensorboard.get_json("/data/plugin/images/images", run=RUN, tag=tag)
        assert [entry["step"] for entry in served] == [step for step, _ in expected], tag
        for entry, (step, pixels) in zip(served, expected, strict=True):
            png = tensorboard.get(f"/data/plugin/images/individualImage?{entry['query']}")
            assert png.startswith(b"\x89PNG\r\n\x1a\n"), (tag, step)
            got = decode_png(png)
            assert got.shape == pixels.shape, (tag, step)
            np.testing.assert_array_equal(got, pixels, err_msg=f"{tag}@{step}")


def test_anomaly_text_served_as_table(tensorboard, probe_run):
    """The anomaly markdown is served at its step, rendered to an HTML table with every cell."""
    _, spec = probe_run
    tags = tensorboard.get_json("/data/plugin/text/tags")[RUN]
    assert set(tags) == set(spec.texts)
    for tag, expected in spec.texts.items():
        served = tensorboard.get_json("/data/plugin/text/text", run=RUN, tag=tag)
        assert [entry["step"] for entry in served] == [step for step, _ in expected], tag
        for entry, (_, markdown) in zip(served, expected, strict=True):
            rendered = entry["text"]
            assert "<table>" in rendered and "<th>" in rendered, rendered
            cells = _markdown_table_cells(markdown)
            assert cells, markdown
            for cell in cells:
                escaped = html.escape(cell, quote=False)
                if len(cell) > 2 and cell[0] == cell[-1] == "`":  # inline code
                    escaped = f"<code>{html.escape(cell[1:-1], quote=False)}</code>"
                assert f"<td>{escaped}</td>" in rendered or f"<th>{escaped}</th>" in rendered, (
                    cell,
                    rendered,
                )


def test_spec_from_events_matches_written(tmp_path):
    """spec_from_events reads back exactly what a run with known values holds (so the demo
    run, whose spec it builds, is checked against what was really written)."""
    written = write_probe_run(tmp_path / "probe")
    read = spec_from_events(tmp_path / "probe")
    assert read.scalars.keys() == written.scalars.keys()
    for tag, series in written.scalars.items():
        assert [s for s, _ in read.scalars[tag]] == [s for s, _ in series]
        np.testing.assert_array_equal(
            np.float32([v for _, v in read.scalars[tag]]), np.float32([v for _, v in series])
        )
    assert read.histograms.keys() == written.histograms.keys()
    for tag, series in written.histograms.items():
        for (s_read, h_read), (s_written, h_written) in zip(
            read.histograms[tag], series, strict=True
        ):
            assert s_read == s_written
            for reader in ("rust", "python"):
                np.testing.assert_allclose(
                    h_read.served(reader), h_written.served(reader), rtol=1e-12
                )
    assert read.images.keys() == written.images.keys()
    for tag, series in written.images.items():
        for (s_read, img_read), (s_written, img_written) in zip(
            read.images[tag], series, strict=True
        ):
            assert s_read == s_written
            np.testing.assert_array_equal(img_read, img_written)
    assert read.texts == written.texts
