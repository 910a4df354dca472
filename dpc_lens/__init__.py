"""dpc_lens: information flow, Dynamic Prompt Corruption and Instance-adaptive Prompting on
TransformerLens models.

The public API is re-exported here lazily, so ``import dpc_lens`` stays light (no torch or
TransformerLens import until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "DpcLensError": "errors", "ConfigError": "errors", "InputError": "errors",
    "DataError": "errors", "ModelError": "errors", "HookError": "errors",
    "SaliencyError": "errors",
    # models
    "ModelAdapter": "model", "as_adapter": "model", "load_model": "model",
    "smollm2_path": "checkpoints", "convert_gguf": "checkpoints",
    # soft prompts and inputs
    "SoftPrompt": "soft_prompt",
    "SegmentLayout": "segments", "PromptBatch": "segments", "encode_pieces": "segments",
    # saliency
    "SaliencyConfig": "saliency", "SaliencyResult": "saliency", "compute_saliency": "saliency",
    "target_nll": "saliency", "saliency_hooks": "saliency", "SaliencyStore": "saliency",
    "flow_proportions": "flows", "saliency_map": "flows",
    # generation and corruption
    "GenerationConfig": "generation", "Generation": "generation", "generate": "generation",
    "CorruptionConfig": "patching", "corrupt_soft_prompt": "patching", "soft_row_hooks": "patching",
    # DPC
    "DetectorConfig": "dpc", "DetectorInputs": "dpc", "TriggerDecision": "dpc",
    "dynamic_trigger": "dpc", "accumulation": "dpc", "deep_flow": "dpc",
    "DPCConfig": "dpc", "analyse": "dpc", "run_dpc": "dpc", "summarize": "dpc",
    "read_records": "runs", "DPCRecord": "dpc", "read_dpc_records": "dpc",
    "CalibrationGrid": "dpc", "calibrate_dpc": "dpc",
    "PromptTuningConfig": "prompt_tuning", "train_soft_prompt": "prompt_tuning",
    "evaluate_accuracy": "prompt_tuning",
    # tasks
    "Example": "tasks", "get_task": "tasks", "load_examples": "tasks",
    # IAP
    "PromptPool": "iap", "IAPConfig": "iap", "FlowStandardizer": "iap", "iap_ss": "iap",
    "iap_mv": "iap", "run_iap": "iap", "calibrate_iap": "iap", "IAPRunConfig": "iap",
    "PairRecord": "iap",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpc_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
