"""Dynamic Prompt Corruption (Fan et al., ICLR 2025; SPEC section 3), one module per concern:

* :mod:`~dpc_lens.dpc.detector` -- accumulation, deep-layer flow and the Dynamic Trigger as pure
  functions of four small tensors (:class:`DetectorInputs`);
* :mod:`~dpc_lens.dpc.sinks` -- attention sinks among the soft tokens, wherever they sit;
* :mod:`~dpc_lens.dpc.locate` -- the locators (the paper's argmax, sink-aware, dev-relative z);
* :mod:`~dpc_lens.dpc.diagnostics` -- sink rate, the Fig. 5 contingency, threshold sweeps,
  instance-adaptivity and the trigger's AUC;
* :mod:`~dpc_lens.dpc.pipeline` -- analyse, trigger, corrupt, regenerate: :func:`run_dpc` and its
  baselines, resumable records, :func:`summarize`;
* :mod:`~dpc_lens.dpc.records` -- :class:`DPCRecord`, one question's typed record (its JSON is a
  line of ``records.jsonl``);
* :mod:`~dpc_lens.dpc.sweep` -- calibration's model-free grid, sweep, scores and sensitivity;
* :mod:`~dpc_lens.dpc.calibration` -- the trigger's knobs fitted on a dev split.

``from dpc_lens.dpc import run_dpc, DPCConfig, ...`` keeps working.
"""

from dpc_lens.layers import LayerSpec, resolve_layers
from dpc_lens.runs import read_records

from .calibration import CalibrationGrid, DPCCalibration, calibrate_dpc
from .detector import (
    AccumulationStats,
    DeepFlowStats,
    DetectorConfig,
    DetectorInputs,
    TriggerDecision,
    accumulation,
    deep_flow,
    dynamic_trigger,
)
from .diagnostics import (
    accumulation_deepflow_contingency,
    fires_at_thresholds,
    fit_sink_scale,
    instance_adaptivity,
    locating_vs_modal,
    sink_rate,
    trigger_auc,
)
from .locate import LocatorProfile
from .pipeline import (
    BASELINES,
    DPC_FLOWS,
    Analysis,
    DPCConfig,
    analyse,
    check_config_fits,
    encode_questions,
    print_summary,
    random_rows_for,
    run_dpc,
    summarize,
)
from .records import AnswerRecord, DPCRecord, read_dpc_records

__all__ = [
    "LayerSpec", "resolve_layers", "read_records",
    "CalibrationGrid", "DPCCalibration", "calibrate_dpc",
    "AccumulationStats", "DeepFlowStats", "DetectorConfig", "DetectorInputs", "TriggerDecision",
    "accumulation", "deep_flow", "dynamic_trigger",
    "accumulation_deepflow_contingency", "fires_at_thresholds", "fit_sink_scale", "sink_rate",
    "instance_adaptivity", "locating_vs_modal", "trigger_auc", "LocatorProfile",
    "BASELINES", "DPC_FLOWS", "Analysis", "DPCConfig", "analyse", "check_config_fits",
    "AnswerRecord", "DPCRecord", "read_dpc_records",
    "encode_questions", "random_rows_for", "run_dpc", "summarize", "print_summary",
]
