"""One adapter over both TransformerLens model families, and the model loader.

dpc_lens accepts a ``TransformerBridge`` (TransformerLens >= 3.4, including 4.x) or a
``HookedTransformer`` (TransformerLens 2.13 - 3.x). Everything else in the library talks to
:class:`ModelAdapter`; it branches only where the two families really differ:

* feeding input embeddings: the bridge passes them to the Hugging Face model as
  ``inputs_embeds`` with explicit ``position_ids``; a HookedTransformer is run from
  ``start_at_layer=0`` with the residual ``embeds (+ positional embedding)`` built here;
* incremental decoding (the bridge hands back Hugging Face's own KV cache).

``hook_embed`` does not fire for embedding input on either family (SPEC section 5), so soft
prompts and corruption live in the embedding tensor, never in a hook.

TransformerLens 4.x raises ``ImportError`` on ``hasattr(transformer_lens, "HookedTransformer")``,
so versions are read from package metadata and the class is imported inside ``try``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import torch

from ._typing import Float, Int, Tensor
from .errors import InputError, ModelError

__all__ = [
    "ModelAdapter",
    "as_adapter",
    "load_model",
    "tl_version",
    "hooked_transformer_class",
    "frozen_for_saliency",
]

Family = Literal["bridge", "hooked"]


def tl_version() -> tuple[int, ...]:
    """The installed transformer-lens version as a tuple of ints (from package metadata)."""
    raw = metadata.version("transformer-lens")
    parts = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def hooked_transformer_class() -> type | None:
    """``HookedTransformer`` on TransformerLens < 4, ``None`` where it no longer exists."""
    if tl_version() >= (4,):
        return None
    try:
        from transformer_lens import HookedTransformer  # type: ignore[attr-defined]
    except ImportError:
        return None
    return HookedTransformer


def _bridge_class() -> type | None:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


# model -> whether its KV cache passed the behaviour probe (ModelAdapter.supports_kv_cache)
_KV_PROBES: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
# model -> its bridge components' places in the HF module tree / whether the direct path is exact
_SWAPS: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()
_DIRECT_EXACT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_DIRECT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()  # in a session now


@contextlib.contextmanager
def _quiet_cache_rename() -> Iterator[None]:
    """TransformerLens 4.3's bridge hands transformers >= 5.24 the KV cache under its deprecated
    name ``past_key_values``; that FutureWarning is about TL's call, not the user's, so it is not
    printed on every decoding run (every other warning still is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        yield


def _attention_bridges(model: Any) -> list[Any]:
    """The TransformerLens attention-bridge modules of a bridge model (none on TL < 3.4)."""
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:
        return []
    # the base class hands its keywords to the Hugging Face attention, which reads ``cache``
    # itself; only re-implemented attention (which calls ``_update_kv_cache``) needs the rename
    return [m for m in model.modules()
            if isinstance(m, AttentionBridge) and type(m).forward is not AttentionBridge.forward]


def _cache_to_past_key_values(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if "cache" in kwargs and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
        return args, kwargs
    return None


@dataclass(frozen=True)
class ModelAdapter:
    """The small protocol dpc_lens needs from a TransformerLens model.

    Build one with :func:`as_adapter` (every public function accepts a raw model too).
    """

    model: Any
    family: Family

    # ----------------------------------------------------------------- facts
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def n_ctx(self) -> int | None:
        n = getattr(self.cfg, "n_ctx", None)
        return int(n) if n else None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """Per layer, its sliding attention window (``None``: a global layer), read from the
        Hugging Face config (``layer_types`` / ``sliding_window``) or TransformerLens's
        (``attn_types`` / ``window_size``); see :func:`dpc_lens.layers.attention_windows`."""
        from .layers import attention_windows

        try:
            config = self._hf_model.config if self.family != "hooked" else self.cfg
        except (ModelError, AttributeError):
            config = self.cfg
        return attention_windows(config, self.n_layers)

    @property
    def hook_dict(self) -> dict:
        return self.model.hook_dict

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    @property
    def embedding_weight(self) -> Tensor:
        """The token embedding matrix ``W_E`` ``[d_vocab, d_model]``."""
        if self.family == "hooked":
            return self.model.W_E
        return self._input_embedding().weight

    def _input_embedding(self) -> Any:
        hf = self._hf_model
        if hasattr(hf, "get_input_embeddings"):
            return hf.get_input_embeddings()
        emb = getattr(hf, "tok_embed", None)  # TransformerLens-native model (boot_native)
        if emb is None:
            raise ModelError(
                f"Cannot find the token embedding of {type(hf).__name__}; dpc_lens needs "
                "get_input_embeddings() (any Hugging Face model) to build soft-prompt inputs."
            )
        return emb

    @property
    def _hf_model(self) -> Any:
        underlying = getattr(getattr(self.model, "_driver", None), "underlying_model", None)
        if underlying is None:
            underlying = getattr(self.model, "original_model", None)
        if underlying is None:
            raise ModelError(
                "This TransformerBridge has no local torch model (its driver runs remotely, "
                "e.g. vLLM or an inspection server), so attention patterns and their gradients "
                "are not available. Boot the model with TransformerBridge.boot_transformers(...) "
                "or dpc_lens.load_model(...)."
            )
        return underlying

    @property
    def positional_embedding_type(self) -> str:
        return str(getattr(self.cfg, "positional_embedding_type", "standard"))

    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(tok, attr, None) if tok is not None else None
            if v is not None:
                return int(v)
        return 0

    # --------------------------------------------------------------- checks
    def check_supported(self) -> None:
        """Raise :class:`ModelError` when the model cannot give attention patterns."""
        if self.family == "bridge":
            hf = self._hf_model
            impl = getattr(getattr(hf, "config", None), "_attn_implementation", "eager")
            if impl not in (None, "eager"):
                raise ModelError(
                    f"The model computes attention with {impl!r}; attention patterns exist only "
                    "with eager attention. Load it with dpc_lens.load_model (forces eager) or "
                    "pass attn_implementation='eager'."
                )
        if "blocks.0.attn.hook_pattern" not in self.hook_dict:
            raise ModelError(
                "The model has no 'blocks.0.attn.hook_pattern' hook, so attention saliency cannot "
                "be measured. dpc_lens needs a decoder with TransformerLens attention hooks."
            )

    # ------------------------------------------------------------ embeddings
    def embed_tokens(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings as the model's own input layer computes them (no positional part)."""
        tokens = tokens.to(self.device)
        if self.family == "hooked":
            return self.model.embed(tokens)
        return self._input_embedding()(tokens)

    def _hooked_residual(self, embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """HookedTransformer: residual entering block 0, and the shortformer embedding if any."""
        kind = self.positional_embedding_type
        if kind in ("standard", "shortformer"):
            dummy = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            pos = self.model.hook_pos_embed(self.model.pos_embed(dummy, 0, attention_mask))
            if kind == "standard":
                return embeds + pos, None
            return embeds, pos
        return embeds, None

    def forward_embeds(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        position_ids: Int[Tensor, "batch pos"],
        logits_at: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits for an input given as embeddings (soft prompt included), left-padded.

        ``position_ids`` must be ``cumsum(mask) - 1`` on real positions (what
        :class:`dpc_lens.segments.PromptBatch` builds); the HookedTransformer derives the same
        positions from the mask itself.

        ``logits_at``: the unembedding runs only at these positions (a 1-D index tensor; the
        result is ``[batch, len(logits_at), d_vocab]``) where :attr:`keeps_logits_subset`;
        callers check it first (elsewhere every position's logits are returned).
        """
        if self.family == "hooked":
            residual, short = self._hooked_residual(embeds, attention_mask)
            kwargs: dict[str, Any] = {"start_at_layer": 0, "attention_mask": attention_mask}
            if short is not None:
                kwargs["shortformer_pos_embed"] = short
            return self.model(residual, **kwargs)
        kwargs = {"attention_mask": attention_mask}
        if self._accepts_position_ids():
            kwargs["position_ids"] = position_ids
        if logits_at is not None and self.keeps_logits_subset:
            kwargs["logits_to_keep"] = logits_at.to(embeds.device)
        if _DIRECT.get(self.model):  # inside decoding_session: the wrapped HF modules directly
            return self._hf_model(inputs_embeds=embeds, **kwargs).logits
        return self.model(embeds, **kwargs)

    def _accepts_position_ids(self) -> bool:
        return "position_ids" in self._forward_params

    @property
    def keeps_logits_subset(self) -> bool:
        """Whether the wrapped Hugging Face model computes logits only where asked
        (``logits_to_keep``, every causal LM in transformers >= 4.45): a saliency pass then
        unembeds only the scored positions, and a prefill only the last one (with a 262,144-word
        vocabulary the unembedding dominates a pass)."""
        return self.family != "hooked" and "logits_to_keep" in self._forward_params

    @functools.cached_property
    def _forward_params(self) -> frozenset[str]:
        """Keyword names of the wrapped model's ``forward`` (read once, not per decoding step)."""
        try:
            return frozenset(inspect.signature(self._hf_model.forward).parameters)
        except (TypeError, ValueError):
            return frozenset()

    def forward_step(
        self,
        tokens: Int[Tensor, "batch 1"],
        attention_mask: Int[Tensor, "batch pos"],
        position_ids: Int[Tensor, "batch 1"],
        cache: Any,
    ) -> tuple[Float[Tensor, "batch 1 d_vocab"], Any]:
        """One incremental decoding step with the bridge's Hugging Face KV cache."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "past_key_values": cache}
        if self._accepts_position_ids():
            kwargs["position_ids"] = position_ids
        if _DIRECT.get(self.model):
            return self._hf_direct(input_ids=tokens.to(self.device), **kwargs)
        with _quiet_cache_rename():
            return self.model(tokens.to(self.device), return_type="logits_and_cache", **kwargs)

    def prefill(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        position_ids: Int[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], Any]:
        """Bridge only: forward over embeddings returning the KV cache and the logits at the
        last position only (``[batch, 1, d_vocab]``) where :attr:`keeps_logits_subset`."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": True}
        if self._accepts_position_ids():
            kwargs["position_ids"] = position_ids
        if self.keeps_logits_subset:  # decoding reads the last position only
            kwargs["logits_to_keep"] = 1
        if _DIRECT.get(self.model):
            return self._hf_direct(inputs_embeds=embeds, **kwargs)
        with _quiet_cache_rename():
            return self.model(embeds, return_type="logits_and_cache", **kwargs)

    def _hf_direct(self, **kwargs: Any) -> tuple[Tensor, Any]:
        """``(logits, cache)`` from the wrapped Hugging Face model itself (decoding_session)."""
        if "past_key_values" in kwargs and "past_key_values" not in self._forward_params \
                and "cache" in self._forward_params:
            kwargs["cache"] = kwargs.pop("past_key_values")  # transformers >= 5.24's name
        kwargs["use_cache"] = True
        out = self._hf_model(**kwargs)
        cache = getattr(out, "past_key_values", None)
        return out.logits, cache if cache is not None else getattr(out, "cache", None)

    @property
    def supports_kv_cache(self) -> bool:
        """Whether incremental decoding with the KV cache gives the logits of a full re-run.

        Decided by behaviour, once per model (not by a parameter name: transformers 5.24 renamed
        ``past_key_values`` to ``cache`` and TransformerLens 4.3's attention bridges kept reading
        the old name, so a signature check turned the cache off without a word while forcing it on
        gave garbage): a 3-token prefill must return a cache holding 3 positions, and one cached
        step must reproduce the full re-run's logits. HookedTransformer is always re-run in full:
        its ``generate(embeds)`` cache path returns wrong tokens for absolute-position models
        (SPEC section 5), and a full re-run is exact for every positional scheme."""
        if self.family != "bridge":
            return False
        known = _KV_PROBES.get(self.model)
        if known is None:
            known = _KV_PROBES[self.model] = self._probe_kv_cache()
        return known

    @property
    def declares_kv_cache(self) -> bool:
        """Whether the wrapped model's ``forward`` takes a KV cache at all (by any of its names)."""
        names = {"past_key_values", "cache", "use_cache"}
        return self.family == "bridge" and bool(self._forward_params & names)

    def _probe_kv_cache(self) -> bool:
        if not self.declares_kv_cache:
            return False
        n_vocab = int(self.embedding_weight.shape[0])
        ids = torch.tensor([[i % n_vocab for i in (1, 2, 3, 4)]], device=self.device)
        mask = torch.ones_like(ids)
        pos = torch.arange(4, device=self.device)[None]
        try:
            with torch.no_grad(), self.kv_cache_session():
                embeds = self.embed_tokens(ids)
                full = self.forward_embeds(embeds, mask, pos)[:, -1].float()
                _, cache = self.prefill(embeds[:, :3], mask[:, :3], pos[:, :3])
                seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
                if cache is None or (seen is not None and int(seen) != 3):
                    return False
                step, _ = self.forward_step(ids[:, 3:], mask, pos[:, 3:], cache)
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            return False
        step = step[:, -1].float()
        tol = (1e-3 if self.dtype == torch.float32 or self.dtype == torch.float64 else 5e-2)
        return bool((step - full).abs().max() <= tol * (1.0 + full.abs().max()))

    @contextlib.contextmanager
    def decoding_session(self) -> Iterator[bool]:
        """Within the block, a bridge whose TransformerLens components add nothing to decoding
        runs the Hugging Face modules they wrap directly (yields whether it does).

        Taken only when no hook is registered on the model's hook points (they would be
        bypassed; a raw torch hook put on a bridge component by hand is bypassed too) and when a
        behaviour probe, once per model, found the direct path's logits *bitwise* equal to the
        bridge's (full pass, prefill and a cached step): so tokens never change, only speed
        (the bridge's per-module Python costs ~40% of a decoding step on small models; e.g.
        TL 4.3's GPT-2 attention re-implementation differs by 1e-7 and keeps the bridge path).
        The wrapped modules are swapped back on exit, also after an exception."""
        swaps = self._bridge_swaps() if self.family == "bridge" else []
        use = bool(swaps) and not self._hooks_registered() and self._direct_path_is_exact(swaps)
        if use:
            for parent, name, comp in swaps:
                parent._modules[name] = comp.original_component
            _DIRECT[self.model] = True
        try:
            yield use
        finally:
            if use:
                _DIRECT.pop(self.model, None)
                for parent, name, comp in swaps:
                    parent._modules[name] = comp

    def _bridge_swaps(self) -> list[tuple[Any, str, Any]]:
        """(parent, attribute, bridge component) for every TransformerLens component sitting
        in the wrapped Hugging Face model's module tree in place of the module it wraps."""
        known = _SWAPS.get(self.model)
        if known is None:
            try:
                from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
                hf = self._hf_model
            except (ImportError, ModelError):
                known = []
            else:
                known = [(parent, name, child)
                         for _, parent in hf.named_modules() if not isinstance(parent, GeneralizedComponent)
                         for name, child in parent._modules.items()
                         if isinstance(child, GeneralizedComponent) and child.original_component is not None]
            _SWAPS[self.model] = known
        return known

    def _hooks_registered(self) -> bool:
        """Any hook on the model's hook points other than TransformerLens's permanent ones."""
        for hp in self.hook_dict.values():
            for handles in (getattr(hp, "fwd_hooks", []), getattr(hp, "bwd_hooks", [])):
                if any(not getattr(h, "is_permanent", False) for h in handles):
                    return True
            if len(hp._forward_hooks) + len(hp._forward_pre_hooks) > sum(
                    1 for h in getattr(hp, "fwd_hooks", []) if getattr(h, "is_permanent", False)):
                return True
        return False

    def _direct_path_is_exact(self, swaps: list[tuple[Any, str, Any]]) -> bool:
        known = _DIRECT_EXACT.get(self.model)
        if known is not None:
            return known
        n_vocab = int(self.embedding_weight.shape[0])
        ids = torch.tensor([[i % n_vocab for i in (1, 5, 2, 7, 3, 4)], [2, 2, 9 % n_vocab, 1, 6, 8]],
                           device=self.device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # a left-padded row, as generation builds them
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        def run() -> list[Tensor]:
            emb = self.embed_tokens(ids)
            outs = [self.forward_embeds(emb, mask, pos)]
            if self.supports_kv_cache:
                with self.kv_cache_session():
                    logits, cache = self.prefill(emb[:, :5], mask[:, :5], pos[:, :5])
                    step, _ = self.forward_step(ids[:, 5:], mask, pos[:, 5:], cache)
                outs += [logits, step]
            return outs

        try:
            with torch.no_grad():
                ref = run()
                for parent, name, comp in swaps:
                    parent._modules[name] = comp.original_component
                _DIRECT[self.model] = True
                try:
                    got = run()
                finally:
                    _DIRECT.pop(self.model, None)
                    for parent, name, comp in swaps:
                        parent._modules[name] = comp
            exact = all(torch.equal(a, b) for a, b in zip(ref, got))
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            exact = False
        _DIRECT_EXACT[self.model] = exact
        return exact

    @contextlib.contextmanager
    def kv_cache_session(self) -> Iterator[None]:
        """Within the block, the bridge's attention modules see the KV cache under the name they
        read. transformers >= 5.24 passes it as ``cache=``; TransformerLens 4.3's re-implemented
        attention bridges read only ``past_key_values`` / ``layer_past`` and would leave the
        cache empty. A forward pre-hook renames the keyword; the hooks are removed on exit, so
        the caller's model is unchanged (even after an exception). A no-op where the names
        already agree."""
        handles = []
        if self.family == "bridge":
            for module in _attention_bridges(self.model):
                handles.append(module.register_forward_pre_hook(_cache_to_past_key_values, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ----------------------------------------------------------------- hooks
    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        """The model's own ``hooks()`` context: removes only what it added, on exit."""
        return self.model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))


def as_adapter(model: Any) -> ModelAdapter:
    """Wrap a ``TransformerBridge`` or ``HookedTransformer`` (an adapter passes through)."""
    if isinstance(model, ModelAdapter):
        return model
    bridge = _bridge_class()
    if bridge is not None and isinstance(model, bridge):
        adapter = ModelAdapter(model, "bridge")
    else:
        ht = hooked_transformer_class()
        if ht is not None and isinstance(model, ht):
            adapter = ModelAdapter(model, "hooked")
        else:
            raise InputError(
                f"Expected a TransformerLens TransformerBridge or HookedTransformer, got "
                f"{type(model).__name__}. Load a model with dpc_lens.load_model(name_or_path) "
                "or TransformerBridge.boot_transformers(...)."
            )
    adapter.check_supported()
    return adapter


@contextlib.contextmanager
def frozen_for_saliency(model: Any) -> Iterator[None]:
    """Within the block: eval mode and ``requires_grad=False`` on every parameter, so a backward
    pass allocates no weight gradients. On exit every flag and the training mode are restored
    exactly, even after an exception."""
    # only touch what needs changing: a model loaded by dpc_lens is already frozen and in eval
    # mode, and walking a bridge's module tree for train()/eval() costs ~15 ms per call
    unfrozen = [p for p in model.parameters() if p.requires_grad]
    training = model.training
    try:
        for p in unfrozen:
            p.requires_grad_(False)
        if training:
            model.eval()
        yield
    finally:
        for p in unfrozen:
            p.requires_grad_(True)
        if training:
            model.train(True)


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    family: Family = "bridge",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Any:
    """Load a Hugging Face checkpoint (local directory or hub id) as a TransformerLens model.

    Models larger than one device: ``device_map`` (``"auto"``, ``"balanced"``, or a dict from
    module name to ``"cuda:0"`` / ``"cpu"`` / ``"disk"``), with ``max_memory`` and
    ``offload_folder``, loads through accelerate's big-model loading (the bridge wraps the
    dispatched model without moving it); soft prompts enter on the embedding's device, and each
    layer's saliency is reduced where the layer runs and gathered on the first layer's device.
    ``device`` and ``device_map`` are exclusive.

    The bridge (``TransformerBridge.boot_transformers``) forces eager attention. The model is put
    in eval mode with every weight frozen. ``device`` defaults to CUDA when present.
    ``family="hooked"`` uses ``HookedTransformer.from_pretrained`` (TransformerLens < 4 only).
    ``name_or_path`` may also be a GGUF file, a directory holding one, or a known real model's
    name (``"smollm2"``: SmolLM2-135M-Instruct; ``"gemma3-270m"``: Gemma 3 270M base, under the
    Gemma Terms of Use; :data:`dpc_lens.checkpoints.KNOWN_MODELS`): converted once into a cached
    Hugging Face directory, see :mod:`dpc_lens.checkpoints`.

    ``progress``: transformers' loading bars (and a GGUF conversion's) follow dpc_lens's rule
    (:func:`dpc_lens.progress.progress_on`): ``None`` shows them only when stderr is a terminal.

    Raises :class:`ModelError` when the weights are neither a local directory nor reachable.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            f"load_model needs a model directory or hub id (a string), got "
            f"{type(name_or_path).__name__} {name_or_path!r}. Pass e.g. load_model('path/to/model') "
            "or load_model('gpt2')."
        )
    name_or_path = os.fspath(name_or_path)
    from .validate import check_device

    if device_map is not None:
        if device is not None:
            raise InputError(
                f"Pass either device={device!r} or device_map, not both: a device map already "
                "says where every module goes (use device_map={'': 'cuda:0'} for one device)."
            )
        if family != "bridge":
            raise ModelError("device_map needs family='bridge' (HookedTransformer loads onto one device).")
        if isinstance(device_map, dict):
            for module, where in device_map.items():
                if where != "disk":
                    check_device(where, name=f"device_map[{module!r}]")
    else:
        device = check_device(device)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise InputError(
                f"Unknown dtype {dtype!r}; expected one of float32, bfloat16, float16."
            ) from None
    from .checkpoints import resolve_source

    # a known real model or a GGUF file/directory -> a converted HF directory (or an in-memory model)
    from .progress import hf_progress, progress_on

    show = progress_on(progress)
    source = resolve_source(name_or_path, progress=show)
    in_memory = not isinstance(source, str)
    name_or_path = name_or_path if in_memory else source
    is_local = in_memory or os.path.isdir(name_or_path)
    if not is_local and (os.sep in name_or_path and name_or_path.startswith((".", os.sep))):
        raise ModelError(f"Model directory {name_or_path!r} does not exist. Pass an existing "
                         "local directory with config.json and weights, or a hub id.")
    try:
        with hf_progress(show):
            model = _boot(name_or_path, source, in_memory, family, device, dtype, device_map,
                          max_memory, offload_folder)
    except (ModelError, InputError):
        raise
    except Exception as exc:
        refused = _refused_pickle(exc, name_or_path if is_local and not in_memory else None)
        if refused is not None:
            raise refused from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        where = "local directory" if is_local else "Hugging Face hub id"
        raise ModelError(
            f"Could not load model {name_or_path!r} as a {where}: {exc}. If the machine is "
            "offline, download the checkpoint elsewhere and pass its local directory "
            "(config.json, weights and tokenizer files)."
        ) from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    as_adapter(model)  # validates attention support
    return model


def _boot(name_or_path: str, source: Any, in_memory: bool, family: str, device: Any, dtype: Any,
          device_map: Any, max_memory: Any, offload_folder: Any) -> Any:
    """The TransformerLens model of a resolved source (the body of :func:`load_model`)."""
    from .checkpoints import boot_in_memory

    if family == "hooked":
        ht = hooked_transformer_class()
        if ht is None:
            raise ModelError(
                "HookedTransformer does not exist in TransformerLens >= 4; use family='bridge' "
                "or install 'transformer-lens<4'."
            )
        kwargs: dict[str, Any] = {"device": device}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return ht.from_pretrained(name_or_path, **kwargs)
    from transformer_lens.model_bridge import TransformerBridge

    if device_map is not None:
        from .checkpoints import load_dispatched

        hf, tok = (source if in_memory else
                   load_dispatched(name_or_path, device_map, max_memory=max_memory,
                                   offload_folder=offload_folder, dtype=dtype))
        return boot_in_memory(hf, tok)
    kwargs = {"device": device}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return (TransformerBridge.boot_transformers(name_or_path, **kwargs)
            if not in_memory else boot_in_memory(*source, **kwargs))


def _refused_pickle(exc: BaseException, directory: str | None) -> ModelError | None:
    """The dpc_lens error for a checkpoint whose pickle torch's safe loader refused (``None`` when
    ``exc`` is something else). torch's own message advises switching the protection off, which
    is the one thing not to do with a file that tries to run code; this one says the file was
    refused and how to get safetensors weights instead."""
    import pickle

    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(e) for e in chain)
    if not (any(isinstance(e, pickle.UnpicklingError) for e in chain)
            or "Weights only load failed" in text or "Unsupported global" in text):
        return None
    why = next((ln.strip() for ln in text.splitlines()
                if "GLOBAL" in ln or "Unsupported global" in ln or "Unsupported operand" in ln), "")
    why = f" (torch's safe loader: {why})" if why and "weights_only" not in why else ""
    files = []
    if directory is not None and os.path.isdir(directory):
        files = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
    where = (", ".join(os.path.join(directory, f) for f in files) if files
             else (directory or "the checkpoint"))
    return ModelError(
        f"Refused to load {where}: the file is a pickle that holds Python objects other than "
        f"tensors{why}, and unpickling such a file can run arbitrary code, so dpc_lens refused it "
        "before anything in it could run. Use the model's safetensors weights instead: download "
        "model.safetensors from where the model is published, or, if you trust the file, convert "
        "it once to safetensors in the program that wrote it (model.save_pretrained(dir) writes "
        "model.safetensors), then pass that directory."
    )
