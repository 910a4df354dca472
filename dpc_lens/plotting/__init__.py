"""Figures of saliency flows, the DPC detector and DPC's outcome, drawn from results only.

Every figure here is built from objects the library already produced — a
:class:`~dpc_lens.saliency.SaliencyResult`, DPC records (:func:`dpc_lens.dpc.run_dpc`, or
:func:`dpc_lens.dpc.read_records` on a ``records.jsonl``), a trigger dict
(:meth:`~dpc_lens.detector.TriggerDecision.to_dict`) — and never runs a model.

Each figure has two halves:

* a pure **data** function (``*_data``) that returns exactly the numbers the figure draws, as
  numpy arrays and plain dicts, so the tests check values, shapes, segment boundaries and marked
  columns without looking at pixels;
* a **builder** (``plot_*``) that draws those numbers and returns a
  :class:`matplotlib.figure.Figure`.

Figure / data pairs:

=========================  ==============================  =====================================
figure                     data                            input
=========================  ==============================  =====================================
:func:`plot_flow_curves`   :func:`flow_curve_data`         records, flows dicts or a result
:func:`plot_saliency_heatmap` :func:`heatmap_data`         a result with ``keep_full=True``
:func:`plot_correct_vs_wrong` :func:`correct_wrong_data`   records
:func:`plot_contingency`   :func:`contingency_data`        records (their trigger dicts)
:func:`plot_trigger`       :func:`trigger_data`            one record / trigger dict / decision
:func:`plot_head_maps`     :func:`head_map_data`           a result with ``per_head=True``
:func:`plot_before_after`  :func:`before_after_data`       records
:func:`plot_score_auc`     :func:`score_auc_data`          an IAP summary (``summary.json``)
:func:`plot_paired_differences` :func:`paired_difference_data` an IAP summary
=========================  ==============================  =====================================

:func:`save` writes a figure as PNG or SVG (by the file extension); :func:`save_standard_figures`
writes the standard set for a DPC output directory (what ``dpc-lens dpc --plots`` calls).
:func:`interactive_saliency` shows a saliency map through circuitsvis when that package is
installed (it is never required).

matplotlib is imported inside the builders only. They create ``matplotlib.figure.Figure``
objects directly, without pyplot: no backend is selected, no global figure list grows, and
saving renders with Agg, so the builders work on a machine without a display. In Jupyter the
inline backend displays a returned figure as usual.

:func:`write_report` writes a run's self-contained ``report.html`` (:mod:`dpc_lens.plotting.report`,
what every run command and ``dpc-lens report`` call); :mod:`dpc_lens.plotting.html` is the one
renderer of tokens shaded by flow behind it and behind ``SaliencyResult.show``.
"""

from ._figure import save
from .dpc import (
    before_after_data,
    contingency_data,
    correct_wrong_data,
    plot_before_after,
    plot_contingency,
    plot_correct_vs_wrong,
    plot_trigger,
    save_standard_figures,
    trigger_data,
)
from .iap import (
    paired_difference_data,
    plot_paired_differences,
    plot_score_auc,
    save_iap_figures,
    score_auc_data,
)
from .report import write_report
from .saliency import (
    DPC_FLOWS,
    IAP_FLOWS,
    FlowCurves,
    HeatmapData,
    flow_curve_data,
    head_map_data,
    heatmap_data,
    interactive_saliency,
    plot_flow_curves,
    plot_head_maps,
    plot_saliency_heatmap,
)

__all__ = [
    "DPC_FLOWS",
    "IAP_FLOWS",
    "FlowCurves",
    "HeatmapData",
    "flow_curve_data",
    "heatmap_data",
    "correct_wrong_data",
    "contingency_data",
    "trigger_data",
    "head_map_data",
    "before_after_data",
    "plot_flow_curves",
    "plot_saliency_heatmap",
    "plot_correct_vs_wrong",
    "plot_contingency",
    "plot_trigger",
    "plot_head_maps",
    "plot_before_after",
    "save",
    "save_standard_figures",
    "write_report",
    "interactive_saliency",
    "score_auc_data",
    "plot_score_auc",
    "paired_difference_data",
    "plot_paired_differences",
    "save_iap_figures",
]

