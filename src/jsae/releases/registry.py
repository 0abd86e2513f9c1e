"""jsae releases inside SAELens's pretrained-SAE directory.

SAELens has no plugin hook for releases: ``SAE.from_pretrained(release, sae_id)`` looks the name up in
``get_pretrained_saes_directory()``, a ``functools.cache``d function that parses SAELens's own
``pretrained_saes.yaml`` (about a second) and returns one shared dict.  jsae integrates in the smallest
way we found, installed once at ``import jsae`` and parsing nothing of SAELens's at import:

1. its own registry :data:`RELEASES` (from ``jsae/releases.yaml``, a small file, and
   :func:`register_release`), in SAELens's ``PretrainedSAELookup`` format;
2. two converters in SAELens's documented ``NAMED_PRETRAINED_SAE_LOADERS`` /
   ``NAMED_PRETRAINED_SAE_CONFIG_GETTERS`` tables: ``jsae_local`` (``repo_id`` is a directory, absolute or
   relative to the installed ``jsae`` package) and ``jsae_hub`` (SAELens's Hugging Face loader, with a
   one-line error when the release is not cached and the hub is unreachable);
3. one wrapper around ``SAE.from_pretrained`` / ``SAE.from_pretrained_with_cfg_and_sparsity`` (the entry
   points every load goes through) that merges :data:`RELEASES` into SAELens's cached directory dict
   right before SAELens reads it, and lets ``sae_id`` be omitted for a release that holds one SAE (the
   design card's ``SAE.from_pretrained("jsae-llava-l16")``);
4. ``get_pretrained_saes_directory`` in its home module answers with the jsae releases merged in (also
   after ``cache_clear()``), and so does the same name in every SAELens module that imported it before jsae
   (``sae_lens.evals`` among them): whichever SAELens module reads the directory first, it lists the jsae
   releases.  (A reference your own code took before ``import jsae`` sees them once anything has merged them.)

:func:`saelens_yaml` writes every release (VISTA's too) in exactly the form of SAELens's ``pretrained_saes.yaml``,
for proposing them upstream (hub repos, stock loader, model ids, Neuronpedia ids of exported SAEs), where none of
this would be needed.
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
UNPUBLISHED: set[str] = set()  # hub releases whose repo is a placeholder until someone publishes them
PACKAGE_ROOT = Path(str(files("jsae")))
_ORIGINAL_DIRECTORY = getattr(directory_module.get_pretrained_saes_directory, "__jsae_wrapped__",
                              directory_module.get_pretrained_saes_directory)


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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds (and offline mode is off)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_release(repo_id: str, folder_name: str, force_download: bool = False) -> None:
    """Fail at once, without the hub client's retries, for a release that is not published yet (its repo is a
    placeholder) or that is neither in the local Hugging Face cache nor reachable."""
    from huggingface_hub import try_to_load_from_cache

    release = next((r for r, lk in RELEASES.items() if lk.repo_id == repo_id), repo_id)
    if release in UNPUBLISHED:
        raise RuntimeError(f"release {release!r} is not published yet ({repo_id} is a placeholder); produce it with: "
                           f"{RECIPES.get(release, 'its recipe in jsae/releases.yaml')}")
    cached = isinstance(try_to_load_from_cache(repo_id, f"{folder_name}/cfg.json"), str)
    if (force_download or not cached) and not _hub_reachable():
        raise _offline_error(repo_id, folder_name, ConnectionError("no connection"))


def jsae_hub_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                    cfg_overrides: dict[str, Any] | None = None):
    """SAELens's Hugging Face loader with a one-line error, at once, when unpublished or offline and not cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    check_hub_release(repo_id, folder_name, force_download)
    try:
        return loaders.sae_lens_huggingface_loader(repo_id, folder_name, device, force_download, cfg_overrides)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise _offline_error(repo_id, folder_name, exc) from exc


def jsae_hub_config_getter(repo_id: str, folder_name: str, device: str | None = None, force_download: bool = False,
                           cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    check_hub_release(repo_id, folder_name, force_download)
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
    published: bool = True,
) -> PretrainedSAELookup:
    """Register a release so that ``SAE.from_pretrained(name, sae_id)`` and ``JointSAE.from_pretrained``
    find it.  ``saes`` holds SAELens's per-SAE entries: ``{"id", "path", "l0"?, "variance_explained"?}``.
    ``conversion_func`` is ``"jsae_hub"`` (``repo_id`` is a hub repo) or ``"jsae_local"`` (a directory);
    ``published=False`` marks a hub release whose repo is still a placeholder (loading it fails at once, naming the
    recipe)."""
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
    (UNPUBLISHED.discard if published else UNPUBLISHED.add)(name)
    if recipe:
        RECIPES[name] = recipe
    if _ORIGINAL_DIRECTORY.cache_info().currsize:  # SAELens's dict exists already: add it now
        _ORIGINAL_DIRECTORY()[name] = lookup
    return lookup


def unregister_release(name: str) -> None:
    RELEASES.pop(name, None)
    RECIPES.pop(name, None)
    UNPUBLISHED.discard(name)
    if _ORIGINAL_DIRECTORY.cache_info().currsize:
        _ORIGINAL_DIRECTORY().pop(name, None)


def directory() -> dict[str, PretrainedSAELookup]:
    """SAELens's pretrained-SAE directory with the jsae releases merged in (parses SAELens's YAML once)."""
    merged = _ORIGINAL_DIRECTORY()
    merged.update(RELEASES)
    return merged


def resolve_sae_id(release: str, sae_id: str | None) -> str:
    """``sae_id``, or the release's only SAE when omitted; one-line errors for unknown names."""
    if release in RELEASES:
        lookup = RELEASES[release]
    else:
        known = directory()
        if release not in known:
            if "/" in release and sae_id is not None:
                return sae_id  # a hub repo id used directly, as SAELens allows
            close = difflib.get_close_matches(release, list(RELEASES) + list(known), n=3)
            hint = f"; did you mean {close}?" if close else f"; jsae releases: {sorted(RELEASES)}"
            raise ValueError(f"unknown release {release!r}{hint}")
        lookup = known[release]
    ids = list(lookup.saes_map)
    if sae_id is None:
        if len(ids) != 1:
            raise ValueError(f"release {release!r} has {len(ids)} SAEs; pass sae_id, one of {ids}")
        return ids[0]
    if sae_id not in ids:
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; its SAEs are {ids}")
    return sae_id


def release_file(release: str, sae_id: str | None = None, filename: str = "labels.json") -> Path:
    """The path of ``filename`` (``labels.json``, ``metrics.json``, ``cfg.json``) in the folder of SAE ``sae_id`` of
    ``release`` (``sae_id`` may be omitted for a release that holds one SAE): in the package for a shipped release,
    in the Hugging Face cache for a hub release (downloaded once).  One-line errors for an unknown release, an
    unreachable hub, and a release without that file."""
    sae_id = resolve_sae_id(release, sae_id)
    lookup = directory()[release]
    folder = lookup.saes_map[sae_id]
    if lookup.conversion_func == "jsae_local":
        path = _local_dir(lookup.repo_id, folder) / filename
        if not path.is_file():
            raise FileNotFoundError(f"release {release!r} ships no {filename} ({path}); rebuild it with "
                                    f"{RECIPES.get(release, 'jsae release build-shipped')}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    check_hub_release(lookup.repo_id, folder)
    try:
        return Path(hf_hub_download(lookup.repo_id, f"{folder}/{filename}"))
    except EntryNotFoundError:
        raise FileNotFoundError(f"release {release!r} has no {folder}/{filename} in {lookup.repo_id}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise _offline_error(lookup.repo_id, folder, exc) from exc


def _with_jsae_releases(method: Any) -> Any:
    """Wrap a ``SAE.from_pretrained*`` classmethod: merge the jsae releases first; resolve a missing
    ``sae_id`` for jsae releases (SAELens's own releases keep SAELens's behaviour)."""
    func = method.__func__

    @functools.wraps(func)
    def wrapper(cls: Any, release: str, sae_id: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if release in RELEASES or sae_id is None:
            directory()
            sae_id = resolve_sae_id(release, sae_id)
        out = func(cls, release, sae_id, *args, **kwargs)
        sae = out[0] if isinstance(out, tuple) else out
        if release in RELEASES:  # where its labels are (jsae.load_labels(sae))
            sae.source_release = (release, sae_id)
        return out

    wrapper.__jsae_wrapped__ = func  # type: ignore[attr-defined]
    return classmethod(wrapper)


def _merged_directory() -> Any:
    @functools.wraps(_ORIGINAL_DIRECTORY)
    def get_pretrained_saes_directory() -> dict[str, PretrainedSAELookup]:
        return directory()

    get_pretrained_saes_directory.cache_clear = _ORIGINAL_DIRECTORY.cache_clear  # type: ignore[attr-defined]
    get_pretrained_saes_directory.cache_info = _ORIGINAL_DIRECTORY.cache_info  # type: ignore[attr-defined]
    get_pretrained_saes_directory.__jsae_wrapped__ = _ORIGINAL_DIRECTORY  # type: ignore[attr-defined]
    return get_pretrained_saes_directory


def install() -> None:
    """Hook jsae releases and converters into SAELens (idempotent; parses nothing of SAELens's)."""
    from sae_lens.saes.sae import SAE

    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault("jsae_local", jsae_local_loader)
    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault("jsae_hub", jsae_hub_loader)
    loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("jsae_local", jsae_local_config_getter)
    loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("jsae_hub", jsae_hub_config_getter)
    if not hasattr(directory_module.get_pretrained_saes_directory, "__jsae_wrapped__"):
        directory_module.get_pretrained_saes_directory = _merged_directory()
    # SAELens modules imported before jsae (sae_lens.evals, ...) bound the original function by name: point them at
    # the merged one too, so the directory holds the jsae releases whichever SAELens module reads it first
    import sys

    for name, module in list(sys.modules.items()):
        if (name == "sae_lens" or name.startswith("sae_lens.")) and \
                getattr(module, "get_pretrained_saes_directory", None) is _ORIGINAL_DIRECTORY:
            module.get_pretrained_saes_directory = directory_module.get_pretrained_saes_directory
    for name in ("from_pretrained", "from_pretrained_with_cfg_and_sparsity"):
        method = SAE.__dict__[name]
        if not hasattr(method.__func__, "__jsae_wrapped__"):
            setattr(SAE, name, _with_jsae_releases(method))
    _load_builtin_releases()


BUILTIN_RELEASE_FILES = ("releases.yaml", "vista/releases/releases.yaml")  # relative to the jsae package


def _load_builtin_releases() -> None:
    for rel in BUILTIN_RELEASE_FILES:
        _register_file(PACKAGE_ROOT / rel)


def _register_file(path: Path) -> None:
    for name, entry in read_releases_yaml(path).items():
        if name not in RELEASES:
            register_release(name, repo_id=entry["repo_id"], model=entry["model"], saes=entry["saes"],
                             conversion_func=entry.get("conversion_func", "jsae_hub"), recipe=entry.get("recipe"),
                             published=bool(entry.get("published", True)))


# ---- the releases.yaml of the package ------------------------------------------------------------


def releases_yaml_path() -> Path:
    return PACKAGE_ROOT / "releases.yaml"


def read_releases_yaml(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else releases_yaml_path()
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


SAELENS_RELEASE_KEYS = ("repo_id", "model", "conversion_func", "links", "config_overrides")
SAELENS_SAE_KEYS = ("id", "path", "l0", "variance_explained", "norm_scaling_factor", "neuronpedia")
UPSTREAM_ORG = "jsae-releases"  # the hub organisation of jsae's releases (a shipped release is pushed to ORG/NAME)


def upstream_repo_id(name: str, entry: dict[str, Any]) -> str:
    """The Hugging Face repo of a release upstream: its ``repo_id`` for a hub release; for a shipped release (whose
    ``repo_id`` is a folder inside the package) ``jsae-releases/NAME``, where ``jsae release push`` puts it."""
    return entry["repo_id"] if entry.get("conversion_func", "jsae_hub") == "jsae_hub" else f"{UPSTREAM_ORG}/{name}"


def upstream_model_id(entry: dict[str, Any]) -> str:
    """The model a release reads: a hub id for a real-model release; for a shipped toy model (no hub id exists; the
    weights ship inside jsae) ``jsae-toy-NAME``, the id the Neuronpedia export uses."""
    model = str(entry["model"])
    if entry.get("conversion_func", "jsae_hub") == "jsae_hub" or "/" in model:
        return model
    return "jsae-toy-" + model.removeprefix("toy-")


def _neuronpedia_ids(root: str | Path | None) -> dict[tuple[str, str], str]:
    """``(SAELens release, sae_id) -> "MODEL/SOURCE"`` of the Neuronpedia exports under ``root`` (their source.jsonl)."""
    import json

    out: dict[tuple[str, str], str] = {}
    if root is None:
        return out
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: no such directory; pass the --out of `jsae look export-neuronpedia`")
    for src in sorted(Path(root).glob("*/*/source.jsonl")):
        rec = json.loads(src.read_text().splitlines()[0])
        if rec.get("saelensRelease") and rec.get("saelensSaeId"):
            out[(rec["saelensRelease"], rec["saelensSaeId"])] = f"{rec['modelId']}/{rec['id']}"
    return out


def _shipped_metric(entry: dict[str, Any], sae: dict[str, Any], key: str) -> Any:
    """``l0`` / ``variance_explained`` of a shipped SAE: its entry's, else its cfg.json metadata's."""
    if key in sae:
        return sae[key]
    if entry.get("conversion_func") != "jsae_local":
        return None
    import json

    cfg = _local_dir(entry["repo_id"], str(sae["path"])) / "cfg.json"
    meta = json.loads(cfg.read_text()).get("metadata", {}) if cfg.is_file() else {}
    value = meta.get(key)
    return round(float(value), 4) if isinstance(value, (int, float)) else None


def all_releases_yaml() -> dict[str, Any]:
    """Every built-in release entry (``jsae/releases.yaml`` and VISTA's ``jsae/vista/releases/releases.yaml``)."""
    data: dict[str, Any] = {}
    for rel in BUILTIN_RELEASE_FILES:
        data.update(read_releases_yaml(PACKAGE_ROOT / rel))
    return data


def saelens_yaml(names: list[str] | None = None, path: str | Path | None = None,
                 neuronpedia: str | Path | None = None) -> str:
    """The releases (default: every built-in jsae release, VISTA's included; ``path``: the releases of that YAML file)
    as entries that could be merged into SAELens's own ``pretrained_saes.yaml``: only the keys SAELens reads;
    ``repo_id`` a Hugging Face repo (:func:`upstream_repo_id`), ``model`` the model's id (:func:`upstream_model_id`),
    no ``conversion_func`` (SAELens's stock ``sae_lens`` loader reads the pushed SAELens-format folders); per SAE
    ``id``, ``path``, ``l0`` and ``variance_explained`` where known (for a JSAE, its default text branch) and, for the
    SAEs exported under ``neuronpedia`` (the ``--out`` of ``jsae look export-neuronpedia``), their ``neuronpedia`` id.
    What stays jsae-specific: a JSAE's ``cfg.json`` says ``architecture: jsae``, so ``import jsae`` must come first."""
    data = read_releases_yaml(path) if path is not None else all_releases_yaml()
    names = sorted(data) if names is None else names
    unknown = [n for n in names if n not in data]
    if unknown:
        raise ValueError(f"unknown release(s) {unknown}; jsae's releases are {sorted(data)}")
    exported = _neuronpedia_ids(neuronpedia)
    out: dict[str, Any] = {}
    for name in names:
        entry = data[name]
        release: dict[str, Any] = {"repo_id": upstream_repo_id(name, entry), "model": upstream_model_id(entry)}
        release.update({k: entry[k] for k in ("links", "config_overrides") if k in entry})
        saes = []
        for s in entry["saes"]:
            row: dict[str, Any] = {"id": s["id"], "path": s["path"]}
            for key in ("l0", "variance_explained"):
                value = _shipped_metric(entry, s, key)
                if value is not None:
                    row[key] = value
            if "norm_scaling_factor" in s:
                row["norm_scaling_factor"] = s["norm_scaling_factor"]
            np_id = s.get("neuronpedia") or exported.get((name, s["id"]))
            if np_id:
                row["neuronpedia"] = np_id
            saes.append(row)
        release["saes"] = saes
        out[name] = release
    return yaml.safe_dump(out, sort_keys=False)


__all__ = ["PACKAGE_ROOT", "RECIPES", "RELEASES", "UNPUBLISHED", "check_hub_release", "directory", "install", "jsae_hub_loader", "jsae_local_loader",
           "release_file",
           "read_releases_yaml", "register_release", "releases_yaml_path", "resolve_sae_id", "saelens_yaml",
           "all_releases_yaml", "unregister_release", "upstream_model_id", "upstream_repo_id"]
