"""Why no gradient reached a layer: one function, :func:`diagnose`, one message per cause."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["diagnose"]


_SUB_ORDER = (
    ("hook_resid_pre", 0), ("hook_in", 0), ("ln1.", 1), ("hook_attn_in", 1), ("hook_q_input", 1),
    ("hook_k_input", 1), ("hook_v_input", 1), ("attn.hook_in", 1), ("attn.q", 2), ("attn.k", 2),
    ("attn.v", 2), ("attn.hook_q", 2), ("attn.hook_k", 2), ("attn.hook_v", 2), ("attn.hook_rot", 2),
    ("attn.hook_attn_scores", 3), ("attn.hook_pattern", 4), ("attn", 5), ("hook_attn_out", 6),
    ("hook_resid_mid", 7), ("hook_mlp_in", 7), ("ln2.", 8), ("mlp", 9), ("hook_mlp_out", 10),
    ("hook_resid_post", 11), ("hook_out", 11),
)


def _hook_position(name: str, n_layers: int) -> tuple[float, int]:
    """Where a hook point sits in the forward: ``(block, order inside the block)``."""
    parts = name.split(" / ")[0].split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        rest = ".".join(parts[2:])
        for prefix, order in _SUB_ORDER:
            if rest.startswith(prefix):
                return float(parts[1]), order
        return float(parts[1]), 5
    if parts[0] in ("ln_final", "unembed", "hook_unembed"):
        return float(n_layers), 0
    return -1.0, 0


def _measurable_after(name: str, layers: Sequence[int], n_layers: int) -> list[int]:
    """The requested layers whose pattern comes after hook ``name`` in the forward."""
    pos = _hook_position(name, n_layers)
    return [l for l in layers if (float(l), 4) > pos]


_POINTS: "weakref.WeakKeyDictionary[Any, list[tuple[list[str], Any]]]" = weakref.WeakKeyDictionary()


def _hook_points(adapter: Any) -> list[tuple[list[str], Any]]:
    """Every hook point of the model with all the names it is known by (a bridge's legacy
    TransformerLens alias first); found once per model (walking ~1,700 names costs ~1.5 ms)."""
    found = _POINTS.get(adapter.model)
    if found is None:
        names: dict[int, list[str]] = {}
        points: dict[int, Any] = {}
        for name, hp in adapter.hook_dict.items():
            names.setdefault(id(hp), []).append(name)
            points[id(hp)] = hp
        found = []
        for key, hp in points.items():
            canonical = getattr(hp, "name", None)
            found.append((sorted(names[key], key=lambda a: a == canonical), hp))
        _POINTS[adapter.model] = found
    return found


def _other_hooks(adapter: Any, ours: set[str]) -> list[str]:
    """Hook points with a non-permanent forward hook besides dpc_lens's capture, by name."""
    out: list[str] = []
    for aliases, hp in _hook_points(adapter):
        if not getattr(hp, "_forward_hooks", True):  # torch's own table: no hook, skip cheaply
            continue
        hooks = getattr(hp, "fwd_hooks", None)
        if not hooks:
            continue
        n = sum(not getattr(h, "is_permanent", False) for h in hooks)
        if any(a in ours for a in aliases):
            n -= 1
        if n > 0:
            out.append(" / ".join(aliases))
    return out


def diagnose(store: Any, p: Any = None) -> str | None:
    """Why the latest (or the given) pass of ``store`` (a :class:`SaliencyStore`) has no saliency
    for some requested layer, as one message per cause; ``None`` when every layer delivered its gradient.

    The causes, each with its own message and fix: no pass ran yet; the hooks ran only with
    gradients off (``torch.no_grad()``, ``generate()``, ``torch.inference_mode()``: the hooks are
    inert there); the forward ran but no backward followed while the hooks were registered; a
    hook of the caller's cut the graph between some layers and the loss (named, with the layers
    that can be measured); the model's pattern hook is off the path to the loss (SPEC section 5).
    """
    if p is None:
        if not store.passes:
            if store.gradless_forwards:
                where = ("torch.inference_mode()" if store._gradless_inference
                         else "torch.no_grad() (generate() runs there too)")
                return (
                    f"The saliency hooks fired {store.gradless_forwards} time(s), always with "
                    f"gradients off, under {where}, where they are inert, so no saliency was "
                    "recorded. Run the forward and its backward with gradients on, inside the "
                    "with block: with model.hooks(fwd_hooks=hooks): loss = ...; loss.backward()."
                )
            return (
                "No forward pass has run through these saliency hooks yet, so there is no result. "
                "Register them and run a forward and its backward first: with "
                "model.hooks(fwd_hooks=hooks): loss = loss_fn(model(...)); loss.backward(); then "
                "call store.result() (or use compute_saliency, which does all of it)."
            )
        p = store.passes[-1]
    layers = store.layers
    missing = [l for l in layers if l not in p.per_layer]
    if not missing:
        return None
    delivered = [l for l in layers if l in p.per_layer]
    n_layers = store.adapter.n_layers if store.adapter is not None else max(layers) + 1
    not_fired = [l for l in missing if l not in p.hooked]
    if not_fired:
        return (
            f"The saliency hooks of layers {not_fired} did not fire in pass {p.index}: was the "
            "forward stopped early (stop_at_layer), or only some of the hooks registered? "
            "Register every (name, fn) pair saliency_hooks returned, or ask for fewer layers."
        )
    if p.cut_by:
        cut = p.cut_by[0]
        can = _measurable_after(cut, layers, n_layers)
        return (
            f"Layers {missing} delivered no attention gradient: your hook {cut!r} returns a "
            "tensor that is not computed from its input (e.g. a detached patch from a cache), so "
            "the loss does not depend on anything before it. Saliency can be measured only after "
            f"that hook: {_layers_advice(can)}, or keep the patch in the graph."
        )
    if delivered and max(missing) < min(delivered):  # every layer before some point is cut off
        first, last_missing = min(delivered), max(missing)
        lo, hi = (float(last_missing), 4), (float(first), 4)
        between = [h for h in p.other_hooks if lo < _hook_position(h, n_layers) <= hi]
        who = (f"your hook {between[0]!r}" if len(between) == 1 else
               f"one of your hooks {between}" if between else
               "something (no hook of yours is registered there: a detach inside the model?)")
        can = _measurable_after(between[0], layers, n_layers) if len(between) == 1 else delivered
        return (
            f"Layers {missing} delivered no attention gradient: {who} cut the graph between layer "
            f"{last_missing}'s attention and layer {first}'s (it returns a tensor not computed "
            "from its input, e.g. a detached patch), so the loss does not depend on the earlier "
            f"layers. Saliency can be measured only after the cut: {_layers_advice(can)}."
        )
    if not p.backward_ran and not delivered:
        return (
            f"Layers {missing} delivered no attention gradient: the forward of pass {p.index} ran "
            "but no backward pass reached the patterns while the hooks were registered. Call "
            "loss.backward() (or torch.autograd.grad) inside the same with block as the forward, "
            "before the hooks are removed, then store.result()."
        )
    return (
        f"Layers {missing} delivered no attention gradient although the backward pass ran. This "
        "model's attention pattern hook is not on the path to the loss (its attention is computed "
        "elsewhere and only reported to hook_pattern; SPEC section 5), so dpc_lens cannot measure "
        "saliency there."
        + (f" Layers {delivered} can be measured: SaliencyConfig(layers={delivered})." if delivered else "")
    )


def _layers_advice(layers: list[int]) -> str:
    if not layers:
        return "no requested layer comes after it"
    return f"pass SaliencyConfig(layers={layers})"
