"""Alias kept for notebooks written before 0.2: the demo and the shipped test bed now live in
:mod:`dpc_lens.testbed` (``from dpc_lens.testbed import default_model``)."""

from .testbed import data_dir, default_model, shipped_artefacts
from .testbed.demo import DEMO_RANDOM_DRAWS, explain_summary, run_demo

__all__ = ["run_demo", "data_dir", "shipped_artefacts", "default_model", "explain_summary",
           "DEMO_RANDOM_DRAWS"]
