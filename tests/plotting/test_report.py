"""The run report (issue 20) in a real browser: headless Chromium from the Debian package.

A real DPC run and a real IAP run of the shipped reasoner (a few questions each) are made through
the command line, which writes ``report.html`` at the end; the page is opened from disk and
checked: it draws something, it asks the network for nothing, every number it shows from
``summary.json`` equals the file, its filters show exactly the questions whose records say so
(counted here from the JSONL, not from the page), and a generation holding ``<script>`` shows
as text and runs nothing. The file stays small at 600 questions.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time

import pytest
from cdp_chromium import Browser

from dpc_lens.cli import main
from dpc_lens.plotting.report import write_report

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def dpc_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpc") / "run")
    rc = main(["dpc", "--model", "testbed", "--soft-prompt", "testbed", "--data", "testbed", "--task",
               "arith", "--config", "testbed", "--limit", "16", "--random-draws", "2", "--out", out,
               "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def iap_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("iap")
    prompts = d / "prompts.txt"
    prompts.write_text("Let's think step by step.\nAbrakadabra!\nIt's a beautiful day.\n", encoding="utf-8")
    out = str(d / "run")
    rc = main(["iap", "--model", "testbed", "--data", "testbed", "--task", "arith", "--limit", "6",
               "--prompts", str(prompts), "--out", out, "--no-progress"])
    assert rc == 0
    return out


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _numeric_leaves(obj, path=()):
    """Every number in a JSON tree with its path (bools are not numbers)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numeric_leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numeric_leaves(v, path + (i,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _lookup(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _not_blank(png: bytes) -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    small = img.resize((img.width // 4, img.height // 4))
    px = [small.getpixel((x, y)) for y in range(small.height) for x in range(small.width)]
    non_white = sum(1 for p in px if sum(p) < 720) / len(px)
    assert non_white > 0.03, f"the screenshot is nearly blank ({non_white:.1%} non-white pixels)"
    assert len(set(px)) > 50, "the screenshot has almost no distinct colours"


def _only_local(urls: list[str], report: str) -> None:
    page = "file://" + os.path.abspath(report)
    bad = [u for u in urls if u != page and not u.startswith("data:")]
    assert not bad, f"the report asked for {bad}"
    assert page in urls  # the page itself was seen, so the event stream did work


def _summary_numbers_equal(page, summary: dict, scope: str = "#summary-body") -> None:
    shown = page.js(f"Array.from(document.querySelectorAll('{scope} [data-key]')).map(e => "
                    "[e.dataset.key, e.dataset.value, e.textContent, e.dataset.scale || '1'])")
    assert shown, "the summary shows no tagged number"
    seen = set()
    for key, value, text, scale in shown:
        path = tuple(json.loads(key))
        want = _lookup(summary, path)
        assert float(value) == want, (path, value, want)
        got = float(text.rstrip("%")) / float(scale)
        tol = (0.0005 if scale == "100" else abs(want) * 5e-4) + 1e-12  # one rounding of the text
        assert math.isclose(got, want, abs_tol=tol), (path, text, want)
        seen.add(path)
    leaves = {p for p, _ in _numeric_leaves(summary)}
    missing = leaves - seen
    assert not missing, f"numbers of summary.json not on the page: {sorted(map(str, missing))[:10]}"


def _click_filter(page, key: str) -> list[str]:
    page.js(f"document.querySelector('.filters button[data-f=\"{key}\"]').click()")
    return page.js("Array.from(document.querySelectorAll('details.q')).filter(q => !q.hidden)"
                   ".map(q => q.dataset.qid)")


# ------------------------------------------------------------------------------- DPC


def test_dpc_report_renders_offline_with_the_summary_numbers(browser, dpc_run):
    report = os.path.join(dpc_run, "report.html")
    assert os.path.exists(report), "dpc did not write its report"
    summary = json.load(open(os.path.join(dpc_run, "summary.json"), encoding="utf-8"))
    page = browser.open(report)
    _not_blank(page.screenshot())
    _only_local(page.requested_urls(), report)
    _summary_numbers_equal(page, summary)
    assert page.js("document.querySelectorAll('img.fig').length") >= 3  # the figures are inlined
    prov = json.load(open(os.path.join(dpc_run, "provenance.json"), encoding="utf-8"))
    assert prov["model"] == "testbed" and prov["task"] == "arith"
    assert "dpc-lens dpc --model testbed" in page.js("document.getElementById('config-body').textContent")


def test_dpc_report_filters_show_exactly_the_matching_questions(browser, dpc_run):
    recs = _records(os.path.join(dpc_run, "records.jsonl"))
    want = {
        "all": [r["id"] for r in recs],
        "fired": [r["id"] for r in recs if r["dpc"]["fired"]],
        "not_fired": [r["id"] for r in recs if not r["dpc"]["fired"]],
        "rw": [r["id"] for r in recs if r["pt"]["correct"] and not r["dpc"]["correct"]],
        "wr": [r["id"] for r in recs if not r["pt"]["correct"] and r["dpc"]["correct"]],
        "dpc_wrong": [r["id"] for r in recs if not r["dpc"]["correct"]],
        "pt_right": [r["id"] for r in recs if r["pt"]["correct"]],
    }
    assert 0 < len(want["fired"]) < len(recs) and 0 < len(want["pt_right"]) < len(recs)  # filters bite
    page = browser.open(os.path.join(dpc_run, "report.html"))
    for key, ids in want.items():
        assert _click_filter(page, key) == ids, key
        assert page.js("document.getElementById('shown').textContent") == str(len(ids))
    # the filter is kept in the address, so a link opens the same view
    page = browser.open(os.path.join(dpc_run, "report.html") + "#filter=fired")
    assert page.js("Array.from(document.querySelectorAll('details.q')).filter(q => !q.hidden).length") \
        == len(want["fired"])


def test_dpc_report_shades_the_rationale_tokens_with_split_and_threshold(browser, dpc_run):
    rec = next(r for r in _records(os.path.join(dpc_run, "records.jsonl")) if r.get("trigger"))
    deep = rec["trigger"]["deep_flow"]
    assert "".join(rec["rationale_tokens"]) == rec["pt"]["rationale"]
    page = browser.open(os.path.join(dpc_run, "report.html"))
    got = page.js(f"""(() => {{
        const q = document.querySelector('details.q[data-qid="{rec['id']}"]');
        const box = q.querySelectorAll('.toks')[0];
        const spans = Array.from(box.children);
        const toks = spans.filter(s => !s.classList.contains('split'));
        return {{text: toks.map(s => s.textContent).join(''),
                 tips: toks.map(s => s.title),
                 shade: toks.map(s => Number(/s(\\d)/.exec(s.className)[1])),
                 hi: toks.map((s, i) => s.classList.contains('hi') ? i : -1).filter(i => i >= 0),
                 split: spans.findIndex(s => s.classList.contains('split'))}};
    }})()""")
    assert got["text"].replace("\u200b", "") == rec["pt"]["rationale"]
    assert [float(t) for t in got["tips"]] == pytest.approx(deep["f"], rel=5e-3, abs=1e-12)  # 3 digits
    # darkness: 10 levels from 0 to the largest f_i
    top = max(deep["f"])
    assert got["shade"] == [round(9 * v / top) if v > 0 else 0 for v in deep["f"]]
    assert got["split"] == deep["n_first"]  # the bar sits before token n_first
    # outlined: second-half tokens above beta, the trigger's own "affected" tokens
    assert got["hi"] == deep["affected_indices"]


def test_a_generated_script_shows_as_text_and_runs_nothing(browser, dpc_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dpc_run, run)
    recs = _records(run / "records.jsonl")
    recs[0]["pt"]["rationale"] = f"4+5=9. {XSS} <img src=x onerror=alert(2)>"
    recs[0]["question"] = f"What is {XSS}?"
    recs[0]["rationale_tokens"] = None
    recs[1]["id"] = f"q{XSS}"
    with open(run / "records.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in recs)
    report = write_report(run, figures=False)
    page = browser.open(report)
    page.js("document.querySelectorAll('details.q').forEach(q => q.open = true)")
    assert page.js("document.querySelectorAll('script').length") == 1  # the report's own only
    assert page.js("document.querySelectorAll('details.q img').length") == 0
    text = page.js("document.querySelector('details.q').textContent")
    assert XSS in text and "<img src=x onerror=alert(2)>" in text
    assert page.js("document.querySelectorAll('details.q')[1].dataset.qid") == f"q{XSS}"
    assert not page.events("Page.javascriptDialogOpening"), "a script from the data ran"
    _only_local(page.requested_urls(), report)


def test_report_stays_small_and_opens_fast_at_600_questions(browser, dpc_run, tmp_path):
    recs = _records(os.path.join(dpc_run, "records.jsonl"))
    longest = max(recs, key=lambda r: len((r.get("trigger") or {}).get("deep_flow", {}).get("f", [])))
    base = json.loads(json.dumps(longest))
    # a rationale of 256 tokens, as a real model's, with its per-token flows
    f = base["trigger"]["deep_flow"]
    base["rationale_tokens"] = [" word"] * 256
    f["f"] = [0.001 * (i % 17) for i in range(256)]
    f["n_first"] = 128
    base["pt"]["rationale"] = base["dpc"]["rationale"] = " word" * 256
    run = tmp_path / "big"
    run.mkdir()
    with open(run / "records.jsonl", "w", encoding="utf-8") as fh:
        for i in range(600):
            r = dict(base, id=f"q{i}")
            r["pt"] = dict(base["pt"], correct=bool(i % 2))
            fh.write(json.dumps(r) + "\n")
    t0 = time.perf_counter()
    report = write_report(run, figures=False)
    built = time.perf_counter() - t0
    size = os.path.getsize(report)
    assert size < 10_000_000, f"{size / 1e6:.1f} MB at 600 questions"
    page = browser.open(report)
    assert page.js("document.querySelectorAll('details.q').length") == 600
    assert page.load_seconds < 5, f"the page took {page.load_seconds:.1f} s to load"
    assert built < 30, built
    assert len(_click_filter(page, "pt_right")) == 300


# ------------------------------------------------------------------------------- IAP


def test_iap_report_renders_offline_with_the_summary_numbers(browser, iap_run):
    report = os.path.join(iap_run, "report.html")
    assert os.path.exists(report), "iap did not write its report"
    summary = json.load(open(os.path.join(iap_run, "summary.json"), encoding="utf-8"))
    page = browser.open(report)
    _not_blank(page.screenshot())
    _only_local(page.requested_urls(), report)
    _summary_numbers_equal(page, summary)


def test_iap_report_filters_and_shows_every_prompt(browser, iap_run):
    qs = _records(os.path.join(iap_run, "questions.jsonl"))
    pairs = _records(os.path.join(iap_run, "pairs.jsonl"))
    page = browser.open(os.path.join(iap_run, "report.html"))
    assert _click_filter(page, "ss_right") == [q["id"] for q in qs if q["iap_ss"]["correct"]]
    assert _click_filter(page, "ss_wrong") == [q["id"] for q in qs if not q["iap_ss"]["correct"]]
    assert _click_filter(page, "none_right") == [q["id"] for q in qs if not q["oracle"]]
    assert _click_filter(page, "all") == [q["id"] for q in qs]
    q = qs[0]
    rows = page.js(f"""Array.from(document.querySelector('details.q[data-qid="{q['id']}"]')
        .querySelectorAll('tr')).slice(1).map(tr => [tr.className, tr.children[2].textContent,
        tr.children[4].textContent])""")
    mine = sorted((p for p in pairs if p["id"] == q["id"]), key=lambda p: p["prompt_index"])
    assert [r[1] for r in rows] == [p["rationale"] for p in mine]
    assert [float(r[2]) for r in rows] == pytest.approx(q["scores_ss"], abs=6e-4)
    assert [i for i, r in enumerate(rows) if r[0] == "chosen"] == [q["iap_ss"]["index"]]


# ------------------------------------------------------------------------------- CLI


def test_report_command_and_no_report(dpc_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(dpc_run, run)
    os.remove(run / "report.html")
    assert main(["report", str(run), "--no-figures"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    out = tmp_path / "quiet"
    assert main(["dpc", "--model", "testbed", "--soft-prompt", "testbed", "--data", "testbed", "--task",
                 "arith", "--limit", "2", "--baselines", "", "--out", str(out), "--no-report",
                 "--no-progress"]) == 0
    assert not (out / "report.html").exists()


def test_calibration_report_shows_calibration_json(browser, tmp_path):
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", "testbed", "--soft-prompt", "testbed", "--data", "testbed", "--task",
                 "arith", "--limit", "4", "--out", str(out), "--no-progress"]) == 0
    cal = json.load(open(out / "calibration.json", encoding="utf-8"))
    page = browser.open(str(out / "report.html"))
    _only_local(page.requested_urls(), str(out / "report.html"))
    _summary_numbers_equal(page, cal)  # every grid point too
    assert page.js("document.querySelector('h1').textContent") == "dpc-lens report: DPC calibration"


def test_regime_checks_say_what_the_numbers_mean():
    from dpc_lens.plotting.report import _regime

    recs = [{"pt": {"correct": True}, "base": {"correct": i < 2}} for i in range(10)]  # PT 10, base 2
    text = _regime({"accuracy": {"pt": 1.0, "base": 0.2}, "ceiling": 0, "pt_only": 8, "trigger_rate": 0.0},
                   recs)
    # every bootstrap resample of ten questions of which 8 are +1 and 2 are 0 has a mean in (0, 1]
    assert "PT − base 80.0% [" in text and "the soft prompt helps" in text
    assert "0 question(s) right without the soft prompt" in text and "(8 the other way)" in text
    assert "never fires: DPC is PT here (0.0%)" in text


def test_a_failing_report_does_not_fail_the_finished_run(tmp_path, capsys, monkeypatch):
    import dpc_lens.plotting.report as report

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "write_report", broken)
    out = tmp_path / "run"
    assert main(["dpc", "--model", "testbed", "--soft-prompt", "testbed", "--data", "testbed", "--task",
                 "arith", "--limit", "2", "--baselines", "", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the report could not be written (RuntimeError: boom)" in err
    assert f"dpc-lens report {out}" in err and (out / "records.jsonl").exists()


def test_iap_prompt_and_generation_scripts_show_as_text(browser, iap_run, tmp_path):
    run = tmp_path / "iap"
    shutil.copytree(iap_run, run)
    pairs = _records(run / "pairs.jsonl")
    pairs[0]["rationale"] = f"{XSS} 4+5=9"
    pairs[0]["prompt"] = f"Think. {XSS}"
    with open(run / "pairs.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    summary = json.load(open(run / "summary.json", encoding="utf-8"))
    summary["n_prompts"] = XSS
    summary["accuracy"]["single"][f"Think. {XSS}"] = 0.5
    summary["degenerate"] = f"IAP-ss is the first prompt {XSS}"
    json.dump(summary, open(run / "summary.json", "w", encoding="utf-8"))
    report = write_report(run, figures=False)
    page = browser.open(report)
    page.js("document.querySelectorAll('details').forEach(q => q.open = true)")
    assert page.js("document.querySelectorAll('script').length") == 1
    body = page.js("document.body.innerText")
    assert body.count(XSS) >= 5  # header, accuracy row, degenerate line, prompt, rationale
    assert not page.events("Page.javascriptDialogOpening")
    _only_local(page.requested_urls(), report)
