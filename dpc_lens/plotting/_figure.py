"""Figures without pyplot: a ``matplotlib.figure.Figure`` made directly (no backend selected,
no global figure list), its display in IPython, and :func:`save` (PNG or SVG by extension)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # matplotlib is imported lazily, inside the builders
    from matplotlib.figure import Figure



# =============================================================================================
# Saving
# =============================================================================================


def _figure(nrows: int, ncols: int, size: tuple[float, float], *, squeeze: bool = True,
            width_ratios: Sequence[float] | None = None) -> tuple[Figure, Any]:
    """A pyplot-free figure (see the module docstring) and its axes."""
    from matplotlib.figure import Figure

    _show_figures_in_ipython(Figure)
    fig = Figure(figsize=size, dpi=100)
    kw = {"width_ratios": list(width_ratios)} if width_ratios is not None else {}
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, gridspec_kw=kw or None)
    return fig, axes


def _show_figures_in_ipython(figure_class: type) -> None:
    """In a Jupyter/IPython shell, make a returned figure display as a PNG.

    matplotlib's inline backend registers that display only once pyplot is imported; these
    figures never touch pyplot, so without this a notebook would print ``<Figure ...>``. Only a
    missing PNG formatter for figures is added (a user's or the inline backend's is kept), and
    outside IPython nothing happens.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return
    png = formatters["image/png"]
    try:
        png.lookup_by_type(figure_class)
    except KeyError:
        png.for_type(figure_class, _png_bytes)


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> str:
    """Write ``fig`` as PNG or SVG, chosen by the extension of ``path``; parent folders are made.
    Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise InputError(f"save writes .png or .svg files; {path!r} has extension {ext or 'none'!r}.")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format=ext[1:], dpi=dpi, bbox_inches="tight")
    return path
