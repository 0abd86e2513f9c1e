"""Push jsae SAEs to the Hugging Face Hub and pull them back, in SAELens's layout.

A pushed repo holds one folder per SAE (``<sae_id>/cfg.json``, ``sae_weights.safetensors`` and, when
present, ``labels.json``, ``metrics.json``, ``sparsity.safetensors``) and a ``README.md`` model card
(front matter ``library_name: saelens``; model, layer, pooling, alignment, metrics, how to load), so
``SAE.from_pretrained("ORG/NAME", "<sae_id>")`` loads it after ``import jsae``.

The hub is reached through ``huggingface_hub.HfApi``; ``endpoint`` picks it: ``None`` (the default hub,
``HF_ENDPOINT``), an ``http(s)://`` URL (another hub server), or a local directory / ``file://`` URL, a
stand-in hub laid out as ``ROOT/ORG/NAME/`` (used by the tests: there is no network here).  Both commit
atomically: a Hub commit is all-or-nothing on the server; the local backend stages the whole new
revision in a hidden sibling folder (written file by file, its ``.jsae_manifest.json`` of sha256 sums
last) and renames it into place, so an interrupted push leaves the previous revision (or nothing)
visible, never a partial one.  The local backend keeps every commit, as the Hub does: ``pull(...,
revision=)`` serves an earlier one by its commit id (:func:`revisions` lists them) and refuses an unknown one.

No SAE with NaN or inf weights is pushed, and none is pulled: a pull is checked before it replaces anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from jsae.files import replace_dir
from jsae.guards import check_output_dir, confined
from jsae.saes.sae_files import CFG_FILE, WEIGHTS_FILE, check_finite_weights, check_sae_dir

SAE_FILES = (CFG_FILE, WEIGHTS_FILE, "sparsity.safetensors", "labels.json", "metrics.json")
MANIFEST = ".jsae_manifest.json"
CARD = "README.md"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_RE.match(repo_id) or ".." in repo_id:
        raise ValueError(f"repo id {repo_id!r} is not of the form ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


# ---- what is pushed ------------------------------------------------------------------------------


def find_saes(directory: str | Path, sae_id: str | None = None) -> dict[str, Path]:
    """``{sae_id: folder}`` of the jsae SAEs in ``directory``: the directory itself when it holds a
    ``cfg.json`` (its id: ``sae_id``, else the cfg's hook name, else the folder name), otherwise each
    sub-folder that holds one.  Raises a one-line error when there is no jsae SAE."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass a jsae SAE folder (cfg.json + sae_weights.safetensors)")
    if (directory / CFG_FILE).is_file():
        cfg = check_sae_dir(directory)
        meta = cfg.get("metadata") or {}
        sid = sae_id or meta.get("hf_hook_name") or meta.get("hook_name") or directory.name
        return {sid: directory}
    subs = sorted(p for p in directory.iterdir() if p.is_dir() and (p / CFG_FILE).is_file())
    if not subs:
        raise ValueError(f"{directory} is not a jsae SAE: no {CFG_FILE} in it or in its sub-folders; pass the folder "
                         "written by JointSAE.save_model / `jsae sae train` (or a folder of such folders)")
    if sae_id is not None:
        raise ValueError(f"{directory} holds several SAEs {[p.name for p in subs]}; sae_id applies to a single SAE folder")
    for p in subs:
        check_sae_dir(p)
    return {p.name: p for p in subs}


def model_card(saes: dict[str, Path], repo_id: str) -> str:
    """The README.md: SAELens front matter, a table of the SAEs with their metrics, how to load them."""
    rows, models, measured = [], [], set()
    for sid, path in saes.items():
        cfg = json.loads((path / CFG_FILE).read_text())
        meta = cfg.get("metadata") or {}
        metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
        models.append(meta.get("model_name"))
        if metrics:
            measured.add(metrics.get("measured_on", "held-out pairs"))
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
        rows.append(f"| `{sid}` | {meta.get('model_name') or '–'} | {meta.get('layer', '–')} | {meta.get('pooling') or '–'} | "
                    f"{meta.get('alignment') or metrics.get('alignment') or '–'} | {cfg['d_in']} | {cfg['d_sae']} | {cfg.get('activation', 'relu')} | "
                    f"{fmt(metrics.get('l0'))} | {fmt(metrics.get('variance_explained'))} | "
                    f"{fmt(metrics.get('variance_explained_vision'))} | {'yes' if (path / 'labels.json').is_file() else 'no'} |")
    model_set = sorted({m for m in models if m})
    base = [m for m in model_set if "/" in m]
    first = next(iter(saes))
    front = ["---", "library_name: saelens", "tags:", "  - saelens", "  - sparse-autoencoder", "  - jsae",
             "  - vision-language", "  - multimodal", "  - interpretability"]
    if base:
        front += ["base_model:"] + [f"  - {m}" for m in base]
    front += ["---", ""]
    body = [
        f"# {repo_id}: Joint Sparse Autoencoders (jsae)", "",
        f"Joint SAEs for {', '.join(model_set) or 'a vision-language model'}: each factorises the sequence-pooled "
        "*vision* activations (image-token positions) and *language* activations (caption positions) of one decoder "
        "layer into sparse features shared across modalities (`architecture: jsae`, a SAELens plugin architecture).", "",
        "| sae_id | model | layer | pooling | alignment | d_in | d_sae | activation | L0 (text) | variance explained (text) "
        "| variance explained (vision) | labels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        (f"Metrics are measured on {' / '.join(sorted(measured))} (pooled). " if measured else
         "No metrics were recorded with these SAEs. ") + "Folders follow SAELens's layout "
        "(`<sae_id>/cfg.json`, `<sae_id>/sae_weights.safetensors`); `labels.json` holds feature → concept labels.", "",
        "## How to load", "", "```bash", "pip install jsae", "```", "", "```python",
        "import jsae                      # registers the 'jsae' architecture in SAELens",
        "from sae_lens import SAE", "",
        f'sae = SAE.from_pretrained("{repo_id}", "{first}")   # -> jsae.JointSAE',
        'z_img = sae.encode(vision_pools, modality="vision")',
        'z_txt = sae.encode(caption_pools, modality="text")', "```", "",
        f"or `jsae release pull {repo_id} --out DIR` and `jsae.JointSAE.load_from_disk(DIR / \"{first}\")`.", "",
    ]
    return "\n".join(front + body)


def _stage(saes: dict[str, Path], repo_id: str, stage: Path) -> list[str]:
    files = []
    for sid, src in saes.items():
        (stage / sid).mkdir(parents=True, exist_ok=True)
        for name in SAE_FILES:
            if (src / name).is_file():
                _copy_file(src / name, stage / sid / name)
                files.append(f"{sid}/{name}")
    (stage / CARD).write_text(model_card(saes, repo_id))
    return files + [CARD]


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- backends ------------------------------------------------------------------------------------


def local_root(endpoint: str | os.PathLike[str] | None) -> Path | None:
    if endpoint is None:
        return None
    s = str(endpoint)
    if s.startswith("file://"):
        return Path(s[len("file://"):]).resolve()
    if re.match(r"^https?://", s):
        return None
    return Path(s).resolve()  # a relative folder works too (its file:// URL needs an absolute path)


class LocalHub:
    """A directory standing in for the Hub: ``ROOT/ORG/NAME/`` per repo (its current revision, ``main``), committed
    by atomic rename.  Every commit is also kept, as the Hub keeps its history: its manifest in
    ``ROOT/.jsae-history/ORG/NAME/<revision>.json`` and its files by sha256 in ``ROOT/.jsae-history/blobs/``, so a
    pull can ask for any earlier ``revision`` (the commit id, or a prefix of at least 7 characters of it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / check_repo_id(repo_id)

    def _history(self, repo_id: str) -> Path:
        return self.root / HISTORY / check_repo_id(repo_id)

    def upload(self, stage: Path, repo_id: str) -> str:
        final = self.repo_dir(repo_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed push
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if (final / MANIFEST).is_file():  # a commit adds to / overwrites the previous revision, as on the Hub
                shutil.copytree(final, tmp, ignore=shutil.ignore_patterns(MANIFEST))
            tmp.mkdir(parents=True, exist_ok=True)
            for src in sorted(p for p in stage.rglob("*") if p.is_file()):
                dst = tmp / src.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _copy_file(src, dst)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            manifest = {"repo_id": repo_id, "files": {f: {"sha256": _sha256(tmp / f), "size": (tmp / f).stat().st_size}
                                                      for f in files}}
            text = json.dumps(manifest, indent=1)
            (tmp / MANIFEST).write_text(text)  # last: a repo with a manifest is complete
            self._record(repo_id, tmp, manifest, text)  # the history first: main never names a revision it lacks
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final.as_uri()

    def _record(self, repo_id: str, folder: Path, manifest: dict[str, Any], text: str) -> str:
        """Keep the commit of ``folder`` in the history (its files by content, then its manifest); its revision id."""
        from jsae.files import write_atomic

        blobs = self.root / HISTORY / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        for f, info in manifest["files"].items():
            blob = blobs / info["sha256"]
            if not blob.is_file():
                part = blobs / f".{info['sha256']}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    shutil.copyfile(folder / f, part)
                    os.replace(part, blob)
                finally:
                    part.unlink(missing_ok=True)
        history = self._history(repo_id)
        history.mkdir(parents=True, exist_ok=True)
        revision = _revision_id(text)
        seq = max((_history_entry(p)[0] for p in history.glob("*.json")), default=0) + 1
        write_atomic(history / f"{revision}.json", json.dumps({"seq": seq, "manifest": text}))
        return revision

    def revisions(self, repo_id: str) -> list[str]:
        """The commit ids of ``repo_id``, newest first (the current revision, ``main``, first)."""
        src = self.repo_dir(repo_id)
        if not (src / MANIFEST).is_file():
            raise FileNotFoundError(f"repo {repo_id!r} not found on {self.root} (no complete revision); push it first with "
                                    f"`jsae release push DIR --repo {repo_id} --hub {self.root}`")
        main = _revision_id((src / MANIFEST).read_text())
        history = self._history(repo_id)
        older = sorted(((_history_entry(p)[0], p.stem) for p in history.glob("*.json")), reverse=True) \
            if history.is_dir() else []
        return [main] + [rev for _, rev in older if rev != main]

    def _resolve(self, repo_id: str, revision: str | None) -> tuple[str, dict[str, Any], Any]:
        """``(revision id, manifest, where(name, info) -> source file)`` of ``revision`` (default: main)."""
        src = self.repo_dir(repo_id)
        revs = self.revisions(repo_id)  # raises for a repo that does not exist
        if revision in (None, "main"):
            rev, text, where = revs[0], (src / MANIFEST).read_text(), None
        else:
            hits = [r for r in revs if len(str(revision)) >= 7 and r.startswith(str(revision).lower())]
            if len(hits) != 1:
                shown = ", ".join(r[:10] for r in revs[:8]) + (" ..." if len(revs) > 8 else "")
                why = "matches several revisions" if hits else "is not a revision of it"
                raise FileNotFoundError(f"revision {revision!r} of {repo_id!r} on {self.root} {why}; its revisions, newest "
                                        f"first: main = {shown} (pass one of these, at least 7 characters)")
            rev = hits[0]
            if rev == revs[0]:
                text, where = (src / MANIFEST).read_text(), None
            else:
                text = _history_entry(self._history(repo_id) / f"{rev}.json")[1]
                where = lambda name, info: self.root / HISTORY / "blobs" / info["sha256"]  # noqa: E731
        try:
            manifest = json.loads(text)
            files = dict(manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the manifest of {repo_id!r} on {self.root} is corrupt ({str(exc).splitlines()[0]}); push it again") from None
        check_repo_paths(files, repo_id)
        if where is None:
            where = lambda name, info: confined(src, name, f"file {name!r} of {repo_id}")  # noqa: E731
        return rev, {**manifest, "files": files}, where

    def download_to_hf_cache(self, repo_id: str, cache_dir: str | Path | None = None, revision: str | None = None,
                             check: Any = None) -> Path:
        """Lay the repo out as the Hugging Face cache does (``models--ORG--NAME/snapshots/<rev>/`` and, for the
        current revision, ``refs/main``, written last), so ``hf_hub_download`` and ``SAE.from_pretrained(repo_id,
        sae_id)`` find it, also with ``HF_HUB_OFFLINE=1``; returns the snapshot folder."""
        from huggingface_hub import constants

        rev, _, _ = self._resolve(repo_id, revision)
        storage = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / rev
        if not snapshot.is_dir():
            (storage / "snapshots").mkdir(parents=True, exist_ok=True)
            self.download(repo_id, snapshot, revision=rev, check=check)
        if revision in (None, "main"):
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            tmp = storage / "refs" / f".main.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(rev)
            os.replace(tmp, storage / "refs" / "main")
        return snapshot

    def download(self, repo_id: str, out: Path, revision: str | None = None, check: Any = None) -> Path:
        """Copy ``revision`` (default: main) of the repo into ``out``, each file checked against its sha256, and
        ``check(folder)`` run on the whole copy before it replaces ``out``."""
        _, manifest, where = self._resolve(repo_id, revision)
        files = manifest["files"]
        if out.is_dir() and any(out.iterdir()) and not (out / CARD).is_file():
            raise FileExistsError(f"{out} is not empty and holds no pulled repo (no {CARD}); pull into a new or empty folder "
                                  "(a pull replaces the folder)")
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for f, info in files.items():
                dst = confined(tmp, f, f"file {f!r} of {repo_id}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                source = where(f, info)
                if not source.is_file():
                    raise ValueError(f"{repo_id}/{f} is missing from {self.root}; the repo is corrupt, push it again")
                shutil.copyfile(source, dst)
                if _sha256(dst) != info["sha256"]:
                    raise ValueError(f"{repo_id}/{f} does not match its manifest checksum; the repo is corrupt, push it again")
            if check is not None:
                check(tmp)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


HISTORY = ".jsae-history"


def _revision_id(manifest_text: str) -> str:
    """A commit id: the sha1 of the revision's manifest (40 hex digits, as a git commit id)."""
    return hashlib.sha1(manifest_text.encode()).hexdigest()


def _history_entry(path: Path) -> tuple[int, str]:
    """``(sequence number, manifest text)`` of one kept commit."""
    try:
        entry = json.loads(path.read_text())
        return int(entry["seq"]), str(entry["manifest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is corrupt ({str(exc).splitlines()[0]}); remove it (that revision is lost)") from None


def check_repo_paths(names: Any, repo_id: str) -> None:
    """Every file name of a repo is a plain relative path that stays inside the folder it is pulled into."""
    from pathlib import PurePosixPath

    for name in names:
        if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("~"):
            raise ValueError(f"{repo_id} lists the file {name!r}, which is not a plain relative path; refusing to pull it")
        pure = PurePosixPath(name)
        if pure.is_absolute() or any(part in ("", "..") for part in pure.parts):
            raise ValueError(f"{repo_id} lists the file {name!r}, which points outside the download folder; refusing to "
                             "pull it (the repo is corrupt or hostile)")


def _check_inside(folder: Path, repo_id: str) -> None:
    """After a download: no file or link of ``folder`` resolves outside it."""
    base = folder.resolve()
    for p in folder.rglob("*"):
        if not p.resolve().is_relative_to(base) and not _in_hf_cache(p):
            raise ValueError(f"{repo_id}: {p.relative_to(folder)} resolves outside {folder}; refusing the download")


def _in_hf_cache(p: Path) -> bool:
    """Hugging Face cache snapshots link into the repo's own ``blobs/`` folder (outside the snapshot, by design)."""
    target = p.resolve()
    return p.is_symlink() and target.parent.name == "blobs" and target.parent.parent in p.parents


def _hf_error(action: str, repo_id: str, exc: Exception) -> RuntimeError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return RuntimeError(f"could not {action} {repo_id!r} on the Hugging Face Hub ({type(exc).__name__}: {first}); "
                        "check the network, HF_TOKEN and the repo id, or pass --hub DIR for a local stand-in")


# ---- public API ----------------------------------------------------------------------------------


def push(directory: str | Path, repo_id: str, *, endpoint: str | os.PathLike[str] | None = None, token: str | None = None,
         private: bool = False, sae_id: str | None = None, commit_message: str | None = None) -> str:
    """Upload the jsae SAE(s) in ``directory`` with a model card to ``repo_id``; returns the repo URL."""
    check_repo_id(repo_id)
    saes = find_saes(directory, sae_id)
    for path in saes.values():  # nothing diverged leaves this machine
        check_finite_weights(path, "refusing to push it: retrain it or push an earlier checkpoint")
    root = local_root(endpoint)
    with tempfile.TemporaryDirectory(prefix="jsae-push-") as tmp:
        stage = Path(tmp) / "repo"
        _stage(saes, repo_id, stage)
        if root is not None:
            return LocalHub(root).upload(stage, repo_id)
        from huggingface_hub import HfApi

        api = HfApi(endpoint=str(endpoint) if endpoint else None, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(stage), repo_id=repo_id,
                                     commit_message=commit_message or f"jsae: upload {', '.join(saes)}")
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many network/HTTP error types
            raise _hf_error("push to", repo_id, exc) from exc
        return str(getattr(info, "repo_url", None) or f"{api.endpoint}/{repo_id}")


def pull(repo_id: str, out: str | Path | None = None, *, endpoint: str | os.PathLike[str] | None = None,
         revision: str | None = None, token: str | None = None) -> Path:
    """Download ``repo_id`` into ``out``, or by default into the Hugging Face cache (where
    ``SAE.from_pretrained(repo_id, sae_id)`` then finds it offline), check every SAE in it; returns the folder."""
    check_repo_id(repo_id)
    if out is not None:
        check_output_dir(out, "--out")
    root = local_root(endpoint)
    if root is not None:  # checked before it replaces anything
        if out is None:
            path = LocalHub(root).download_to_hf_cache(repo_id, revision=revision, check=_check_pulled)
        else:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            path = LocalHub(root).download(repo_id, out, revision=revision, check=_check_pulled)
        return path
    from huggingface_hub import HfApi, snapshot_download

    try:
        names = HfApi(endpoint=str(endpoint) if endpoint else None, token=token).list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many network/HTTP error types
        raise _hf_error("pull", repo_id, exc) from exc
    check_repo_paths(names, repo_id)  # before anything is written
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_dir=str(out) if out else None,
                                      endpoint=str(endpoint) if endpoint else None, token=token))
    except Exception as exc:  # noqa: BLE001
        raise _hf_error("pull", repo_id, exc) from exc
    _check_inside(path, repo_id)
    _check_pulled(path)
    return path


def _check_pulled(folder: Path) -> None:
    """A pulled repo holds jsae SAEs (:func:`find_saes`) whose weights are all finite."""
    for path in find_saes(folder).values():
        check_finite_weights(path, "the pushed SAE is broken (a diverged run); nothing was pulled: ask for an earlier "
                                   "revision (--revision) or a repaired push")


def revisions(repo_id: str, *, endpoint: str | os.PathLike[str] | None = None, token: str | None = None) -> list[str]:
    """The commit ids of ``repo_id``, newest first (what ``pull(..., revision=)`` takes)."""
    check_repo_id(repo_id)
    root = local_root(endpoint)
    if root is not None:
        return LocalHub(root).revisions(repo_id)
    from huggingface_hub import HfApi

    try:
        return [c.commit_id for c in HfApi(endpoint=str(endpoint) if endpoint else None, token=token).list_repo_commits(repo_id)]
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many network/HTTP error types
        raise _hf_error("list the revisions of", repo_id, exc) from exc


__all__ = ["LocalHub", "find_saes", "model_card", "pull", "push", "revisions"]
