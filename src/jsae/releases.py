"""jsae releases inside SAELens's pretrained-SAE directory.

SAELens has no plugin hook for releases: ``SAE.from_pretrained(release, sae_id)`` looks the name up in
``get_pretrained_saes_directory()``, a ``functools.cache``d function that reads only SAELens's own
``pretrained_saes.yaml``.  jsae therefore

1. keeps its own registry (:data:`RELEASES`, filled from ``jsae/releases.yaml`` and by
   :func:`register_release`), in SAELens's ``PretrainedSAELookup`` format;
2. wraps ``get_pretrained_saes_directory`` in the SAELens modules that call it, so that every lookup
   (cached or after ``cache_clear()``) sees the jsae releases merged in;
3. adds two converters to ``NAMED_PRETRAINED_SAE_LOADERS``: ``jsae_local`` (``repo_id`` is a directory,
   absolute or relative to the installed ``jsae`` package) and ``jsae_hub`` (SAELens's Hugging Face
   loader, with a clear error when the release is not cached and the hub is unreachable).

Everything happens at ``import jsae`` and is idempotent.
"""

from __future__ import annotations

import difflib
import functools
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading import pretrained_saes_directory as directory_module
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

RELEASES: dict[str, PretrainedSAELookup] = {}
RECIPES: dict[str, str] = {}  # release -> how to produce it (shown when it cannot be loaded)
PACKAGE_ROOT = Path(str(files("jsae")))


def _local_dir(repo_id: str, folder_name: str) -> Path:
    root = Path(repo_id)
    if not root.is_absolute():
        root = PACKAGE_ROOT / root
    return root / folder_name


def jsae_local_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                      cfg_overrides: dict[str, Any] | None = None):  # noqa: ARG001
    """SAELens converter for releases stored in a local directory (shipped with the package)."""
    path = _local_dir(repo_id, folder_name)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"release files missing: {path}/cfg.json; reinstall jsae or rebuild the release")
    cfg, state = loaders.sae_lens_disk_loader(path, device, cfg_overrides)
    return cfg, state, None


def jsae_local_config_getter(repo_id: str, folder_name: str, device: str | None = None, force_download: bool = False,
                             cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ARG001
    return loaders.get_sae_lens_config_from_disk(_local_dir(repo_id, folder_name), device, cfg_overrides)


def _offline_error(repo_id: str, folder_name: str, exc: Exception) -> RuntimeError:
    release = next((r for r, lk in RELEASES.items() if lk.repo_id == repo_id), repo_id)
    recipe = RECIPES.get(release, "see the release's entry in jsae/releases.yaml")
    return RuntimeError(
        f"release {release!r} ({repo_id}/{folder_name}) is not in the local Hugging Face cache and the hub "
        f"cannot be reached ({type(exc).__name__}); download it once online, or produce it with: {recipe}"
    )


def jsae_hub_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                    cfg_overrides: dict[str, Any] | None = None):
    """SAELens's Hugging Face loader with a one-line error when offline and not cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return loaders.sae_lens_huggingface_loader(repo_id, folder_name, device, force_download, cfg_overrides)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise _offline_error(repo_id, folder_name, exc) from exc


def jsae_hub_config_getter(repo_id: str, folder_name: str, device: str | None = None, force_download: bool = False,
                           cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return loaders.get_sae_lens_config_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise _offline_error(repo_id, folder_name, exc) from exc


def register_release(
    name: str,
    *,
    repo_id: str,
    model: str,
    saes: list[dict[str, Any]],
    conversion_func: str = "jsae_hub",
    recipe: str | None = None,
    overwrite: bool = False,
) -> PretrainedSAELookup:
    """Register a release so that ``SAE.from_pretrained(name, sae_id)`` and ``JointSAE.from_pretrained``
    find it.  ``saes`` holds SAELens's per-SAE entries: ``{"id", "path", "l0"?, "variance_explained"?}``.
    ``conversion_func`` is ``"jsae_hub"`` (``repo_id`` is a hub repo) or ``"jsae_local"`` (a directory)."""
    if name in RELEASES and not overwrite:
        raise ValueError(f"release {name!r} is already registered; pass overwrite=True to replace it")
    if conversion_func not in loaders.NAMED_PRETRAINED_SAE_LOADERS:
        raise ValueError(f"unknown conversion_func {conversion_func!r}; use 'jsae_hub' or 'jsae_local'")
    if not saes or any("id" not in s or "path" not in s for s in saes):
        raise ValueError(f"release {name!r} needs a non-empty list of SAEs, each with an 'id' and a 'path'")
    lookup = PretrainedSAELookup(
        release=name,
        repo_id=repo_id,
        model=model,
        conversion_func=conversion_func,
        saes_map={s["id"]: str(s["path"]) for s in saes},
        expected_var_explained={s["id"]: s.get("variance_explained", 1.0) for s in saes},
        expected_l0={s["id"]: s.get("l0", 0.0) for s in saes},
        neuronpedia_id={s["id"]: s.get("neuronpedia") for s in saes},
        norm_scaling_factor={s["id"]: s["norm_scaling_factor"] for s in saes if "norm_scaling_factor" in s},
        config_overrides=None,
    )
    RELEASES[name] = lookup
    if recipe:
        RECIPES[name] = recipe
    directory_module.get_pretrained_saes_directory()  # merge now, into the cached dict
    return lookup


def unregister_release(name: str) -> None:
    RELEASES.pop(name, None)
    RECIPES.pop(name, None)
    directory_module.get_pretrained_saes_directory().pop(name, None)


def resolve_sae_id(release: str, sae_id: str | None) -> str:
    """``sae_id``, or the release's only SAE when omitted; one-line errors for unknown names."""
    directory = directory_module.get_pretrained_saes_directory()
    if release not in directory:
        if "/" in release and sae_id is not None:
            return sae_id  # a hub repo id used directly, as SAELens allows
        close = difflib.get_close_matches(release, list(RELEASES) + list(directory), n=3)
        hint = f"; did you mean {close}?" if close else f"; jsae releases: {sorted(RELEASES)}"
        raise ValueError(f"unknown release {release!r}{hint}")
    ids = list(directory[release].saes_map)
    if sae_id is None:
        if len(ids) != 1:
            raise ValueError(f"release {release!r} has {len(ids)} SAEs; pass sae_id, one of {ids}")
        return ids[0]
    if sae_id not in ids:
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; its SAEs are {ids}")
    return sae_id


def _merged_directory(original: Any) -> Any:
    @functools.wraps(original)
    def get_pretrained_saes_directory() -> dict[str, PretrainedSAELookup]:
        directory = original()
        directory.update(RELEASES)
        return directory

    get_pretrained_saes_directory.cache_clear = original.cache_clear  # type: ignore[attr-defined]
    get_pretrained_saes_directory.__jsae_wrapped__ = original  # type: ignore[attr-defined]
    return get_pretrained_saes_directory


def install() -> None:
    """Hook jsae releases and converters into SAELens (idempotent)."""
    import importlib

    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault("jsae_local", jsae_local_loader)
    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault("jsae_hub", jsae_hub_loader)
    loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("jsae_local", jsae_local_config_getter)
    loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("jsae_hub", jsae_hub_config_getter)
    current = directory_module.get_pretrained_saes_directory
    if not hasattr(current, "__jsae_wrapped__"):
        merged = _merged_directory(current)
        for mod_name in ("sae_lens.loading.pretrained_saes_directory", "sae_lens.loading.pretrained_sae_loaders",
                         "sae_lens.saes.sae", "sae_lens.evals", "sae_lens"):
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001 - optional SAELens modules (evals pulls in heavy deps)
                continue
            if getattr(mod, "get_pretrained_saes_directory", None) is current:
                mod.get_pretrained_saes_directory = merged
    _load_builtin_releases()


def _load_builtin_releases() -> None:
    path = files("jsae").joinpath("releases.yaml")
    if not path.is_file():
        return
    data = yaml.safe_load(path.read_text()) or {}
    for name, entry in data.items():
        if name not in RELEASES:
            register_release(name, repo_id=entry["repo_id"], model=entry["model"], saes=entry["saes"],
                             conversion_func=entry.get("conversion_func", "jsae_hub"), recipe=entry.get("recipe"))
