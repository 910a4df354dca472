"""Tests for dpc_lens.dpc.calibration.

The model-free core is fed hand-built DetectorInputs whose trigger outcomes and located rows are
worked out by hand below, with a hand-made "corrupted answer is correct" table; every expected
accuracy is counted by hand in the comments. One small end-to-end run on a tiny model checks that
calibration generates once per distinct (example, rows) pair, not once per grid point.
"""

from __future__ import annotations

import json

import pytest
import torch

import dpc_lens.dpc.calibration as C
from dpc_lens.dpc import DPCConfig
from dpc_lens.dpc.calibration import CalibrationGrid, calibrate_from_cache, needed_pairs, sweep_triggers
from dpc_lens.dpc.detector import DetectorConfig, DetectorInputs, dynamic_trigger
from dpc_lens.errors import ConfigError, DataError, InputError


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def inst(col0, col1, raw1, norm1) -> DetectorInputs:
    """2 layers, 3 soft tokens, 4 rationale tokens (r1 = tokens 0-1, r2 = tokens 2-3).

    Layer 0 holds ``col0`` as soft columns, layer 1 ``col1``; the rationale rows of layer 1 are
    ``raw1`` (raw) and ``norm1`` (normalised); layer 0's rows are a flat decoy. Normalised
    columns are the raw ones / 10 (the same ranking), so the rows located depend only on the
    shallow layer set and k.
    """
    decoy = [0.05] * 4
    cols = t([col0, col1])
    return DetectorInputs(
        soft_columns=cols,
        soft_columns_norm=cols / 10,
        rationale_rows=t([decoy, raw1]),
        rationale_rows_norm=t([decoy, norm1]),
    )


# Deep flow on layer 1, beta = mean of the first two tokens; share = affected of the last two.
#            shallow [0] cols   shallow [1] cols   raw rows (share)      norm rows (share)
A = inst([3, 2, 1], [1, 2, 3], [1, 1, 2, 2], [0.5, 0.5, 0.1, 0.1])  # raw 1.0, norm 0.0
B = inst([1, 3, 2], [3, 1, 2], [1, 1, 2, 0], [0.1, 0.1, 0.5, 0.5])  # raw 0.5, norm 1.0
Cx = inst([2, 1, 3], [2, 3, 1], [1, 1, 0, 0], [0.2, 0.2, 0.3, 0.1])  # raw 0.0, norm 0.5
INPUTS = [A, B, Cx, None]  # the fourth instance has an empty rationale: it never fires
PT_CORRECT = [False, True, False, True]
# Located rows (sorted):   shallow [0]: k=1  k=2      shallow [1]: k=1  k=2
#                       A           (0,)  (0, 1)                   (2,)  (1, 2)
#                       B           (1,)  (1, 2)                   (0,)  (0, 2)
#                       C           (2,)  (0, 2)                   (1,)  (0, 1)
CORRUPTED = {
    (0, (0,)): True,
    (0, (0, 1)): False,
    (0, (2,)): False,
    (0, (1, 2)): False,
    (1, (1,)): False,
    (1, (1, 2)): False,
    (1, (0,)): True,
    (1, (0, 2)): False,
    (2, (2,)): True,
    (2, (0, 2)): False,
    (2, (1,)): False,
    (2, (0, 1)): False,
}
GRID = CalibrationGrid(
    R=(0.25, 0.75),
    statistic=("raw", "normalized"),
    top_k=(1, 2),
    shallow_layers=([0], [1]),
    deep_layers=([1],),
    sink=("keep",),
)

# Who fires: raw R=.25 -> A, B; raw R=.75 -> A; normalized R=.25 -> B, C; normalized R=.75 -> B.
# Correct answers (out of 4; D always contributes its PT answer, right):
#                     s0k1  s0k2  s1k1  s1k2
#   raw  R=0.25        2     1     2     1      (A, B corrupted; C: PT wrong; D right)
#   raw  R=0.75        3     2     2     2      (A corrupted; B PT right)
#   norm R=0.25        2     1     2     1
#   norm R=0.75        1     1     2     1
HAND = {
    ("raw", 0.25): [2, 1, 2, 1],
    ("raw", 0.75): [3, 2, 2, 2],
    ("normalized", 0.25): [2, 1, 2, 1],
    ("normalized", 0.75): [1, 1, 2, 1],
}


def expected_accuracy(point: dict) -> float:
    col = {(0, 1): 0, (0, 2): 1, (1, 1): 2, (1, 2): 3}
    key = col[(point["shallow_layers"][0], point["top_k"])]
    return HAND[(point["statistic"], point["R"])][key] / 4


def test_sweep_matches_direct_trigger_calls():
    sweep = sweep_triggers(INPUTS, GRID)
    assert sweep.n_points == GRID.size == 16
    for p, point in enumerate(sweep.points):
        cfg = sweep.config(p)
        assert cfg.R == point["R"] and cfg.statistic == point["statistic"] and cfg.top_k == point["top_k"]
        for i, x in enumerate(INPUTS):
            if x is None:
                assert not sweep.fired[p, i] and sweep.point_rows(p)[i] == ()
                continue
            d = dynamic_trigger(x, cfg)
            assert bool(sweep.fired[p, i]) == d.fired
            assert sweep.point_rows(p)[i] == tuple(sorted(d.accumulation.top_indices))


def test_needed_pairs_are_the_distinct_fired_pairs():
    sweep = sweep_triggers(INPUTS, GRID)
    # every instance A, B, C fires somewhere, with all four row sets: 12 distinct pairs
    assert needed_pairs(sweep) == sorted(CORRUPTED)
    # raw statistic only: A and B fire (C's raw share is 0) -> 8 pairs
    raw = sweep_triggers(INPUTS, CalibrationGrid(**{**GRID.to_dict(), "statistic": ["raw"]}))
    assert needed_pairs(raw) == sorted(k for k in CORRUPTED if k[0] in (0, 1))


def test_grid_picks_the_known_best_point_and_accuracies_by_hand():
    cal = calibrate_from_cache(INPUTS, PT_CORRECT, CORRUPTED, GRID)
    for point, acc in zip(cal.points, cal.accuracy):
        assert acc == pytest.approx(expected_accuracy(point)), point
    assert cal.best_point == {
        "statistic": "raw",
        "beta": "first_half_mean",
        "top_k": 1,
        "shallow_layers": [0],
        "deep_layers": [1],
        "sink": "keep",
        "R": 0.75,
    }
    assert cal.best_accuracy == pytest.approx(3 / 4)
    assert cal.pt_accuracy == pytest.approx(2 / 4)
    assert cal.gain == pytest.approx(1 / 4)
    assert cal.best_trigger_rate == pytest.approx(1 / 4)  # only A fires
    assert cal.n_no_rationale == 1
    # PT right: B, D; a corrupted answer right somewhere: A (0,), B (0,), C (2,) -> all 4
    assert cal.corruption_oracle_accuracy == 1.0
    det = cal.config.detector
    assert (det.statistic, det.R, det.top_k, det.shallow_layers, det.deep_layers) == (
        "raw",
        0.75,
        1,
        (0,),
        (1,),
    )
    best = cal.points.index(cal.best_point)
    assert (cal.wrong_to_right[best], cal.right_to_wrong[best]) == (1, 0)


def test_sensitivity_table_by_hand():
    cal = calibrate_from_cache(INPUTS, PT_CORRECT, CORRUPTED, GRID)
    sens = {k: [(r["value"], r["at_best"], r["best"]) for r in rows] for k, rows in cal.sensitivity.items()}
    q = 0.25
    # at_best: the best point (raw, R .75, shallow [0], k 1) with one knob changed;
    # best: the maximum of the HAND table over the points with that value.
    assert sens["statistic"] == [("raw", 3 * q, 3 * q), ("normalized", 1 * q, 2 * q)]
    assert sens["R"] == [(0.25, 2 * q, 2 * q), (0.75, 3 * q, 3 * q)]
    assert sens["top_k"] == [(1, 3 * q, 3 * q), (2, 2 * q, 2 * q)]
    assert sens["shallow_layers"] == [([0], 3 * q, 3 * q), ([1], 2 * q, 2 * q)]
    assert sens["deep_layers"] == [([1], 3 * q, 3 * q)]
    assert sens["sink"] == [("keep", 3 * q, 3 * q)]
    assert sens["beta"] == [("first_half_mean", 3 * q, 3 * q)]


def test_ties_go_to_fewer_fired_then_grid_order():
    # every corrupted answer right (out of 4, any row set):
    #   raw R=.25  (A, B fire): A T, B T, C F (PT), D T = 3   -- 2 fired
    #   raw R=.75  (A fires):   A T, B T (PT), C F, D T  = 3   -- 1 fired
    #   norm R=.25 (B, C fire): A F (PT), B T, C T, D T  = 3   -- 2 fired
    #   norm R=.75 (B fires):   A F, B T, C F, D T       = 2
    # the tie at 3/4 goes to raw R=.75 (fewest fired), then to the first in grid order
    # (grid order: statistic, beta, top_k, shallow, deep, sink, R) -> k=1, shallow [0].
    table = {k: True for k in CORRUPTED}
    cal = calibrate_from_cache(INPUTS, PT_CORRECT, table, GRID)
    assert cal.best_accuracy == pytest.approx(3 / 4)
    assert cal.best_point["statistic"] == "raw" and cal.best_point["R"] == 0.75
    assert (cal.best_point["shallow_layers"], cal.best_point["top_k"]) == ([0], 1)


def test_no_gain_means_never_firing_is_chosen():
    table = {k: False for k in CORRUPTED}
    grid = CalibrationGrid(**{**GRID.to_dict(), "R": [0.25, 0.75, 1.0]})
    cal = calibrate_from_cache(INPUTS, PT_CORRECT, table, grid)
    assert cal.best_accuracy == cal.pt_accuracy == 0.5
    assert cal.best_trigger_rate == 0.0 and cal.best_point["R"] == 1.0


def test_score_points_pure_and_missing_pair_error():
    from beartype import beartype
    from jaxtyping import jaxtyped

    score_points = jaxtyped(typechecker=beartype)(C.score_points)  # shapes checked at run time
    fired = torch.tensor([[True, False], [False, False], [True, True]])
    rows = [[(1, 0), ()], [(), ()], [(0, 1), (2,)]]
    scores = score_points(fired, rows, [False, True], {(0, (0, 1)): True, (1, (2,)): False})
    assert scores.accuracy.tolist() == [1.0, 0.5, 0.5]
    assert scores.n_fired.tolist() == [1, 0, 2]
    assert scores.wrong_to_right.tolist() == [1, 0, 1]
    assert scores.right_to_wrong.tolist() == [0, 0, 1]
    with pytest.raises(InputError, match=r"instance 1 with rows \[2\]"):
        score_points(fired, rows, [False, True], {(0, (0, 1)): True})


def test_sink_exclude_and_fixed_beta_in_the_grid():
    grid = CalibrationGrid(
        R=(0.25,),
        statistic=("raw",),
        beta_values=(1.5,),
        top_k=(1,),
        shallow_layers=([0],),
        deep_layers=([1],),
        sink=("keep", "exclude"),
    )
    sweep = sweep_triggers(INPUTS, grid)
    labels = [(p["beta"], p["sink"]) for p in sweep.points]
    assert labels == [
        ("first_half_mean", "keep"),
        ("first_half_mean", "exclude"),
        (1.5, "keep"),
        (1.5, "exclude"),
    ]
    # A's shallow [0] columns [3, 2, 1]: keep -> row 0, exclude -> row 1
    assert sweep.point_rows(0)[0] == (0,) and sweep.point_rows(1)[0] == (1,)
    # fixed beta 1.5 on raw rows: A's r2 = [2, 2] both > 1.5 (share 1), B's [2, 0] (share .5),
    # C's [0, 0] (share 0); R = .25 -> A and B fire
    assert sweep.fired[2].tolist() == [True, True, False, False]


def test_sink_normalize_fits_a_scale():
    grid = CalibrationGrid(
        R=(0.5,),
        statistic=("raw",),
        top_k=(1,),
        shallow_layers=([0],),
        deep_layers=([1],),
        sink=("normalize",),
    )
    sweep = sweep_triggers(INPUTS, grid)
    # c_0 / mean(c_1, c_2) over layer 0: A 3/1.5 = 2, B 1/2.5 = .4, C 2/2 = 1 -> median 1
    assert sweep.settings[0].sink_scale == pytest.approx(1.0)
    assert any("sink_scale" in n for n in sweep.notes)


def test_layer_sets_that_do_not_fit_are_dropped_or_merged():
    grid = CalibrationGrid(
        R=(0.5,),
        statistic=("raw",),
        top_k=(1,),
        shallow_layers=("shallow", [1], (0.0, 0.5)),
        deep_layers=("deep", (0.75, 1.0)),
    )
    sweep = sweep_triggers(INPUTS, grid)
    shallow = {json.dumps(p["shallow_layers"]) for p in sweep.points}
    deep = {json.dumps(p["deep_layers"]) for p in sweep.points}
    assert shallow == {'"shallow"', "[0.0, 0.5]"}  # [1] == "shallow" on 2 layers: merged
    assert deep == {'"deep"'}  # (0.75, 1.0) selects no layer of a 2-layer model: dropped
    assert len(sweep.notes) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"R": (1.5,)}, r"R holds 1.5.*\[0, 1\]"),
        ({"R": ()}, "R is empty"),
        ({"statistic": ("loss",)}, "statistic holds 'loss'"),
        ({"top_k": (0,)}, "top_k holds 0"),
        ({"top_k": (1, 1)}, "top_k lists 1 twice"),
        ({"shallow_layers": ((0.5, 0.2),)}, "shallow_layers.*fraction pair"),
        ({"sink": ("drop",)}, "sink holds 'drop'"),
        ({"beta_values": (-1.0,)}, "beta_values holds -1.0"),
        ({"include_first_half_mean": False}, "no beta to try"),
        ({"R": 0.5}, "must be a sequence"),
    ],
)
def test_grid_validation_messages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationGrid(**kwargs)


def test_defaults_and_topk_too_large():
    g = CalibrationGrid()
    assert g.R == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert g.statistic == ("raw", "normalized") and g.betas == ("first_half_mean",)
    assert g.top_k == (1, 2, 3) and g.shallow_layers[0] == "shallow" and g.deep_layers[0] == "deep"
    assert CalibrationGrid.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(InputError, match="top_k=3 but only 2 soft positions"):
        sweep_triggers(INPUTS, CalibrationGrid(top_k=(3,), sink=("exclude",)))


def test_save_load_and_dataframes(tmp_path):
    cal = calibrate_from_cache(
        INPUTS, PT_CORRECT, CORRUPTED, GRID, n_generations={"pt": 4, "corrupted": 12, "total": 16}
    )
    cal.save(tmp_path)
    loaded = DPCConfig.load(tmp_path / "dpc_config.json")
    assert loaded.to_dict() == cal.config.to_dict()
    back = C.DPCCalibration.load(tmp_path)
    assert back.to_dict() == cal.to_dict()
    df = cal.to_dataframe()
    assert len(df) == 16 and df["is_best"].sum() == 1
    assert df.loc[df["is_best"], "accuracy"].item() == pytest.approx(0.75)
    sdf = cal.sensitivity_dataframe()
    assert set(sdf["knob"]) == set(C.KNOBS)
    with pytest.raises(DataError, match="does not exist"):
        C.DPCCalibration.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# End to end on a tiny model
# ------------------------------------------------------------------------------------------


class _ToyTask:
    """Gold answer = the first number the model writes (so some answers are right)."""

    name = "toy"

    def extract_answer(self, text):
        toks = text.split()
        return toks[0] if toks else None

    def is_correct(self, prediction, gold):
        return prediction == gold


def test_calibrate_dpc_generates_once_per_distinct_pair(tiny_llama, monkeypatch):
    from dpc_lens import generation
    from dpc_lens.dpc import analyse
    from dpc_lens.generation import GenerationConfig, generate
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks.base import Example

    torch.manual_seed(0)
    soft = SoftPrompt(torch.randn(4, tiny_llama.cfg.d_model) * 0.5)
    before = soft.embeddings.clone()
    questions = ["how many apples", "the cat has 3 pens", "bob buys 2 books", "what is 4 plus 5"]
    gen_cfg = GenerationConfig(max_new_tokens=5, batch_size=4)
    base = DPCConfig(generation=gen_cfg, baselines=())
    # gold = the PT answer for half of them, something else for the rest
    pt = generate(tiny_llama, questions, soft, gen_cfg, add_bos=True, progress=False)
    task = _ToyTask()
    golds = [task.extract_answer(g.text) if i % 2 == 0 else "zzz" for i, g in enumerate(pt)]
    examples = [Example(f"q{i}", q, golds[i] or "zzz") for i, q in enumerate(questions)]
    grid = CalibrationGrid(
        R=(0.0, 0.3, 0.6),
        statistic=("raw", "normalized"),
        top_k=(1, 2),
        shallow_layers=("shallow", (0.0, 0.5)),
        deep_layers=("deep",),
        sink=("keep", "exclude"),
    )

    rows_generated: list[int] = []
    real = generation._generate_batch

    def counting(adapter, seqs, soft_, cfg, gen):
        rows_generated.append(len(seqs))
        return real(adapter, seqs, soft_, cfg, gen)

    monkeypatch.setattr(generation, "_generate_batch", counting)
    cal = C.calibrate_dpc(tiny_llama, soft, examples, task, base, grid, progress=False)
    monkeypatch.undo()

    # independent recount of the distinct fired (example, rows) pairs from analyse + the detector
    analyses = analyse(tiny_llama, soft, questions, base, progress=False)
    pairs = set()
    for point in cal.points:
        cfg = DetectorConfig.from_dict({**cal.config.detector.to_dict(), **_detector_fields(point)})
        for i, a in enumerate(analyses):
            if a.inputs is None:
                continue
            d = dynamic_trigger(a.inputs, cfg)
            if d.fired:
                pairs.add((i, tuple(sorted(d.accumulation.top_indices))))
    assert len(pairs) > 0
    assert cal.n_generations == {
        "pt": 4,
        "corrupted": len(pairs),
        "total": 4 + len(pairs),
        "naive": cal.n_generations["naive"],
    }
    assert sum(rows_generated) == 4 + len(pairs)
    assert sum(rows_generated) < cal.n_generations["naive"]  # not grid-size times
    assert torch.equal(soft.embeddings, before)
    # the chosen config reproduces its dev accuracy through run_dpc
    from dpc_lens.dpc import run_dpc

    _, summary = run_dpc(tiny_llama, soft, examples, task, cal.config, progress=False)
    assert summary["accuracy"]["dpc"] == pytest.approx(cal.best_accuracy)
    assert summary["accuracy"]["pt"] == pytest.approx(cal.pt_accuracy)


def _detector_fields(point: dict) -> dict:
    beta = point["beta"]
    sink = point["sink"]
    return {
        "statistic": point["statistic"],
        "top_k": point["top_k"],
        "R": point["R"],
        "shallow_layers": point["shallow_layers"],
        "deep_layers": point["deep_layers"],
        "sink": sink,
        "sink_scale": None,
        "beta_mode": "first_half_mean" if beta == "first_half_mean" else "fixed",
        "beta_value": None if beta == "first_half_mean" else beta,
    }
