"""Instance-adaptive Prompting (IAP): the candidate pool, the score and the selection strategies.

IAP (Yuan et al., "Instance-adaptive Zero-shot Chain-of-Thought Prompting", NeurIPS 2024,
arXiv 2409.20441) answers each question with a hard prompt chosen *per instance* from a pool of
candidates. For every (question, prompt) pair it generates a rationale, measures three saliency
flows over ``[question; prompt; rationale]`` and combines them into one score; then

* **IAP-ss** (sequential substitution) walks the pool in order and stops at the first prompt whose
  score clears a threshold (falling back to the best-scoring prompt when none does), and
* **IAP-mv** (majority vote) scores every prompt and takes the majority answer among the top m.

Reported with LLaMA-3-8B-Instruct against the best single prompt: GSM8K 64.52 -> 66.34,
SVAMP 73.67 -> 77.33, Causal Judgement 18.18 -> 29.95, CSQA 64.95 -> 68.39. Good prompts show a
strong question->prompt flow in shallow layers and a sustained question/prompt->rationale flow in
deeper ones.

The first half of this module is *model-free*: the prompt pool, per-flow standardisation fitted on
dev data, the synthesised score, the two strategies and the baselines on hand-given scores and
answers, and grid-search calibration of lambda, tau and m. None of it runs a model or touches a
hook, so every rule is tested with numbers worked out by hand.

The second half (below the "model part" banner) is the pipeline: :func:`score_pairs` generates a
rationale for every (question, prompt) pair and runs one saliency pass over
``[question; prompt; rationale]`` (:func:`encode_pair` builds the layout, chat template
included); :func:`run_iap` caches one (answer, flows) record per pair in a resumable
``pairs.jsonl``, which every strategy and baseline then reads (:func:`evaluate`);
:func:`calibrate_iap` fits the standardiser and lambda, tau, m on a dev split with the
model-free :func:`calibrate`. It runs the model only through :mod:`dpc_lens.generation` and
:mod:`dpc_lens.saliency` (imported when called), so the hooks stay in one place.

Cost accounting: IAP-ss can stop early, so :func:`iap_ss` reports ``n_tried`` (prompts that had
to be generated and scored before it stopped); IAP-mv always needs the whole pool.

The package, one module per concern (model-free at the bottom, the model on top):

* :mod:`~dpc_lens.iap.pool` -- the candidate prompts;
* :mod:`~dpc_lens.iap.score` -- standardisation, :class:`IAPConfig`, the synthesised score;
* :mod:`~dpc_lens.iap.select` -- IAP-ss, IAP-mv and the baselines on given scores;
* :mod:`~dpc_lens.iap.calibration` -- grid search of lam, tau, m on cached records;
* :mod:`~dpc_lens.iap.diagnostics` -- can the score choose? within-question and pooled AUC,
  degenerate configurations, paired-bootstrap differences;
* :mod:`~dpc_lens.iap.summary` -- every strategy on cached pairs, the run summary and its text;
* :mod:`~dpc_lens.iap.pipeline` -- generate and score pairs, run, evaluate, calibrate on a model.
"""

from dpc_lens.layers import LayerSpec, resolve_layers

from .calibration import CalibrationResult, QuestionRecord, calibrate
from .pipeline import (
    DEFAULT_LAM_GRID,
    DEFAULT_M_GRID,
    DEFAULT_TAU_GRID,
    IAPCalibration,
    IAPRunConfig,
    PairRecord,
    calibrate_iap,
    encode_pair,
    evaluate,
    fit_standardizer,
    format_summary,
    question_records,
    run_iap,
    score_pairs,
)
from .pool import (
    DEFAULT_PROMPTS,
    FLOW_PR,
    FLOW_QP,
    FLOW_QR,
    IAP_FLOWS,
    PROMPT_GROUPS,
    CandidatePrompt,
    PromptPool,
)
from .score import FlowStandardizer, IAPConfig, synthesized_score
from .select import SelectionResult, iap_mv, iap_ss, majority_vote, single_prompt_answers

__all__ = [
    "FLOW_QP", "FLOW_QR", "FLOW_PR", "IAP_FLOWS", "PROMPT_GROUPS", "CandidatePrompt",
    "DEFAULT_PROMPTS", "PromptPool", "FlowStandardizer", "LayerSpec", "resolve_layers",
    "IAPConfig", "synthesized_score", "SelectionResult", "iap_ss", "iap_mv", "majority_vote",
    "single_prompt_answers", "QuestionRecord", "CalibrationResult", "calibrate",
    "IAPRunConfig", "encode_pair", "PairRecord", "score_pairs", "fit_standardizer",
    "question_records", "evaluate", "IAPCalibration", "calibrate_iap", "run_iap",
    "format_summary", "DEFAULT_LAM_GRID", "DEFAULT_TAU_GRID", "DEFAULT_M_GRID",
]
