"""The report: report.json validates against its schema and refuses numbers without baselines;
report.html is self-contained (every image a PNG data URI), keeps the last row of a repeated
training step, and marks a metric a baseline matches; the raw-input baselines' shapes."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation import baselines, page, plots, report
from pipeline.evaluators.base import Metric


def an_entry(**change) -> dict:
    m = Metric("knn", "top1", 0.8, (0.75, 0.85), 0.1, 400, {"k": 20})
    e = report.entry(m, baselines={"random_init": 0.3, "raw_input": 0.5}, encoder="vit mae", data="emoji",
                     n_train=800, seconds=1.5)
    return {**e, **change}


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_report_json_validates_against_schema(tmp_path):
    retrieval = an_entry(task="retrieval", metric="text_to_image_R@5", n_train=None, interval=None,
                         baselines={"random_init": 0.05, "raw_input": None, "chance": 0.05})
    written = report.write_report(tmp_path, [an_entry(), retrieval], {"encoder_run": "runs/a"})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == written and on_disk["version"] == 1 and on_disk["entries"][0]["baselines"]["chance"] == 0.1
    report.validate(on_disk)
    schema = json.loads(report.SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("change, message", [
    ({"value": "high"}, r"entries\.0\.value: 'high' is not of type 'number'"),
    ({"interval": [0.1]}, r"entries\.0\.interval"),
    ({"n_test": 1.5}, r"entries\.0\.n_test: 1.5 is not of type 'integer'"),
    ({"seconds": -1.0}, r"entries\.0\.seconds: -1.0 is less than the minimum of 0"),
    ({"colour": "red"}, r"entries\.0: .*'colour' was unexpected"),
])
def test_report_rejects_what_the_schema_forbids(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        report.write_report(tmp_path, [an_entry(**change)], {})
    assert not (tmp_path / "report.json").exists()


def test_missing_baselines_raise(tmp_path):
    e = an_entry()
    del e["baselines"]["raw_input"]
    with pytest.raises(ValueError, match=r"entry 0 \(knn/top1\) lacks baseline 'raw_input'"):
        report.write_report(tmp_path, [e], {})
    with pytest.raises(ValueError, match="has no baselines"):
        report.write_report(tmp_path, [an_entry(baselines=None)], {})


def test_dedup_keeps_the_last_row_of_a_step():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},
            {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}, {"note": "no step"}]  # resumed after step 1
    assert plots.dedup_steps(rows) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]


def test_write_html_is_self_contained(tmp_path):
    rng = np.random.default_rng(0)
    lost = an_entry(metric="top5", value=0.5)  # raw input 0.5: the encoder does not beat it
    confusion = an_entry(task="linear_probe", extra={"confusion": [[5, 1], [0, 6]], "labels": [0, 1]})
    rep = report.write_report(tmp_path, [an_entry(), lost, confusion], {"encoder_run": "runs/<a>"})
    curves = {"pretrain": [{"step": s, "loss": 1.0 / (s + 1), "lr": 0.1} for s in range(20)]}
    examples = [{"query": "a cat", "hits": [
        {"key": "k1", "score": 0.9, "image_png_bytes": png_bytes(1), "correct": True},
        {"key": "k2", "score": 0.5, "audio_bytes": b"fLaC", "mime": "audio/flac", "correct": False}]}]
    path = page.write_html(tmp_path, rep, curves=curves, retrieval_examples=examples,
                             embedding_map={"x": rng.normal(size=(3000, 8)), "labels": rng.integers(0, 3, 3000)})
    text = path.read_text()
    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", text)
    assert len(srcs) == 4  # loss curves, confusion (taken from the entry), embedding map, one hit
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "<audio controls" in text and "data:audio/flac;base64," in text
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", text)  # nothing fetched
    assert text.count("class='num lose'") == 1 and "runs/&lt;a&gt;" in text


def test_loss_curves_plot_the_deduplicated_rows(monkeypatch):
    assert plots.loss_curves_png({"s": [{"step": 0, "lr": 1.0}]}) is None  # no loss key: no figure
    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"")
    rows = [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 5.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    plots.loss_curves_png({"pretrain": rows})
    (line,) = figures[0].axes[0].get_lines()
    assert line.get_xdata().tolist() == [0, 1, 2] and line.get_ydata().tolist() == [2.0, 1.0, 0.5]


def test_median_rank_loses_when_not_lower():
    e = an_entry(metric="text_to_image_median_rank", value=40.0,
                 baselines={"random_init": 40.0, "raw_input": None, "chance": 50.0})
    assert report.loses(e, "random_init") and not report.loses(e, "chance") and not report.loses(e, "raw_input")


def test_raw_input_baselines():
    train = [f"word{i} shared words here" for i in range(30)]
    xtr, xte = baselines.tfidf_features(train, ["word3 shared", "unseen text"])
    assert xtr.dtype == np.float32 and xtr.shape[1] == xte.shape[1] and not xte[1].any()  # vocabulary from train only
    wide, _ = baselines.tfidf_features(train, ["word1"], max_dims=8)
    assert wide.shape == (30, 8)
    images = np.full((4, 3, 5, 5), 255, dtype=np.uint8)
    assert baselines.pixel_features(images).shape == (4, 75) and baselines.pixel_features(images).max() == 1.0
    mels = np.stack([np.tile(np.arange(6.0)[:, None], (1, 10))])[:, None]  # [1, 1, 6, 10]: bin b holds b
    stats = baselines.logmel_stats(mels)
    assert stats.shape == (1, 12) and stats[0, :6].tolist() == list(range(6)) and not stats[0, 6:].any()
    with pytest.raises(ValueError, match="expected"):
        baselines.logmel_stats(np.zeros((2, 6, 10)))
