"""IAP figures: the data functions return exactly the summary's numbers (points for the
differences), the builders draw them, and a summary without diagnostics says how to get them."""

from __future__ import annotations

import json
import math

import pytest

from dpc_lens.errors import DataError
from dpc_lens.plotting import (
    paired_difference_data,
    plot_paired_differences,
    plot_score_auc,
    save_iap_figures,
    score_auc_data,
)

SUMMARY = {
    "score_diagnostics": {
        "question->prompt": {"within_question_auc": 0.25, "within_question_ci95": [0.1, 0.4],
                             "within_question_pairs": 12, "pooled_auc": 0.6, "pooled_ci95": [0.5, 0.7]},
        "score": {"within_question_auc": None, "within_question_ci95": None, "within_question_pairs": 0,
                  "pooled_auc": None, "pooled_ci95": None},
    },
    "paired_differences": {"iap_ss": {"vs_first_prompt": {"diff": 0.125, "ci95": [-0.05, 0.3]},
                                      "vs_best_single": {"diff": -0.5, "ci95": [-0.75, -0.25]}}},
    "reference_prompts": {"first": "A.", "best_single": "B.", "best_single_chosen_on": "dev"},
    "dev": {"score_diagnostics": {"score": {"within_question_auc": 0.9, "within_question_ci95": [0.8, 1.0],
                                            "within_question_pairs": 3, "pooled_auc": 0.7,
                                            "pooled_ci95": [0.6, 0.8]}}},
}


def test_score_auc_data_is_the_summarys_numbers():
    d = score_auc_data(SUMMARY)
    assert list(d) == ["test", "dev"]
    qp, score = d["test"]
    assert qp == {"name": "question->prompt", "within": 0.25, "within_ci": [0.1, 0.4], "pooled": 0.6,
                  "pooled_ci": [0.5, 0.7], "pairs": 12}
    assert math.isnan(score["within"]) and math.isnan(score["pooled_ci"][0]) and score["pairs"] == 0
    assert d["dev"][0]["within"] == 0.9
    fig = plot_score_auc(SUMMARY)
    assert len(fig.axes) == 2 and [a.get_title() for a in fig.axes] == ["test", "dev"]


def test_paired_difference_data_in_points():
    d = paired_difference_data(SUMMARY)
    assert d["rows"] == [
        {"method": "iap_ss", "reference": "vs_first_prompt", "diff": 12.5, "ci": [-5.0, 30.0]},
        {"method": "iap_ss", "reference": "vs_best_single", "diff": -50.0, "ci": [-75.0, -25.0]},
    ]
    assert d["reference_prompts"]["best_single"] == "B."
    fig = plot_paired_differences(SUMMARY)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["vs first prompt: 'A.'", "vs best single: 'B.'"]


def test_figures_of_a_run_directory_and_old_summaries(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY), encoding="utf-8")
    paths = save_iap_figures(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["score_auc.png", "paired_differences.png"]
    for name in ("score_auc.png", "paired_differences.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    with pytest.raises(DataError, match=r"no score_diagnostics .* run_iap\(\.\.\., resume=True\)"):
        score_auc_data({"accuracy": {}})
    with pytest.raises(DataError, match="does not exist; run `dpc-lens iap --out DIR` first"):
        score_auc_data(tmp_path / "nope")
