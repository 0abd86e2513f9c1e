"""The one reader of what jsae writes to disk for people to look at.

A **run directory** (``jsae demo --out RUN``)::

    RUN/run.json                      the configuration and the data fingerprint of every part
    RUN/capture/<part>/               pooled captures (manifest.json + shards)
    RUN/saes/<method>/layer_<L>/      SAELens directories (cfg.json, sae_weights.safetensors, labels.json)
    RUN/metrics.json                  SAE metrics, cells, summary (schema in the README)
    RUN/report.md, dose_response.png, features.html

:class:`RunDir` finds each of these; :func:`resolve_sae_dir` / :func:`load_labelled_sae` read one SAE
folder (or a shipped release by name) with its labels, and :meth:`RunDir.of_sae` finds the run that holds
an SAE folder, if any.  Reports, plots, the feature browser and the Neuronpedia export read through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsae.labels import FeatureLabels

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class MethodInfo:
    """What the reports need to know of one protocol method (the registry :data:`METHOD_INFO`).

    ``joint``: its SAE is a JSAE with a vision and a text branch (the feature browser shows it); ``derived_from``:
    the method whose trained weights it reuses (not trained on its own, so the table of trained joint SAEs leaves it
    out); ``colour``: its colour in every plot (Okabe–Ito, readable with colour-blindness)."""

    name: str
    joint: bool
    colour: str
    description: str
    derived_from: str | None = None


#: The protocol's methods, in their report order: the one list of their names (``jsae.protocol.methods.METHODS``
#: is its keys; training them is ``jsae.protocol.methods.train_methods``).
METHOD_INFO: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("jsae", True, "#0072B2", "JSAE with the cosine alignment loss (the paper)"),
    MethodInfo("jsae-none", True, "#E69F00", "the same JSAE without the alignment loss (the ablation)"),
    MethodInfo("separate", True, "#CC79A7", "two independent SAEs paired after training (jsae-none's weights, text "
                                            "latents permuted by Hungarian matching of codes)", derived_from="jsae-none"),
    MethodInfo("saelens-topk", False, "#009E73", "a plain SAELens TopK SAE on the vision pools"),
)}


@dataclass(frozen=True)
class RunDir:
    """A protocol run directory (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def exists(self) -> bool:
        return self.run_file.is_file()

    def capture_dir(self, part: str) -> Path:
        return self.path / "capture" / part

    def sae_dir(self, method: str, layer: int) -> Path:
        return self.path / "saes" / method / f"layer_{layer}"

    def run_info(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text()) if self.exists() else {}

    def metrics(self) -> dict[str, Any]:
        if not self.metrics_file.is_file():
            raise FileNotFoundError(f"{self.path} has no {METRICS_FILE}; run `jsae demo --out {self.path}` first")
        return json.loads(self.metrics_file.read_text())

    def curves(self, *, layer: int | None = None, key: str | None = None, measure: str | None = None) -> list[dict[str, Any]]:
        """The run's curve summaries (``metrics.json`` ``summary.curves``: measure, positions, key, layer, concept,
        features, r50, ...); [] when the run has no readable metrics yet."""
        try:
            rows = self.metrics().get("summary", {}).get("curves", [])
        except (FileNotFoundError, ValueError):
            return []
        return [r for r in rows if (layer is None or r["layer"] == layer) and (key is None or r["key"] == key)
                and (measure is None or r["measure"] == measure)]

    @classmethod
    def of_sae(cls, sae_dir: str | Path) -> "RunDir | None":
        """The run that holds ``sae_dir`` as ``RUN/saes/<method>/layer_<L>``, or None."""
        p = Path(sae_dir).resolve()
        if p.parent.parent.name != "saes" or not p.name.startswith("layer_"):
            return None
        run = cls(p.parent.parent.parent)
        return run if run.exists() or run.metrics_file.is_file() else None


def resolve_sae_dir(sae: str | Path) -> Path:
    """A SAE folder, or the folder of a shipped (``jsae_local``) release given by name."""
    from jsae.releases.registry import RELEASES, release_file, resolve_sae_id

    p = Path(sae)
    if p.is_dir():
        return p
    name = str(sae)
    if name in RELEASES and RELEASES[name].conversion_func == "jsae_local":
        return release_file(name, None, "cfg.json").parent
    if name in RELEASES:
        raise ValueError(f"release {name!r} is not shipped with jsae; pull it first (`jsae release pull {RELEASES[name].repo_id}`)"
                         " and pass the SAE folder")
    if len(p.parts) > 1 or p.exists():  # a path, not a release name
        what = "is a file, not an SAE folder" if p.exists() else "no such directory"
        raise FileNotFoundError(f"{sae}: {what}; pass a SAE folder (cfg.json + sae_weights.safetensors) or a release name")
    resolve_sae_id(name, None)  # unknown names: one-line error with close names
    raise FileNotFoundError(f"{sae} is not a directory")


def load_labelled_sae(sae: str | Path) -> tuple[Any, FeatureLabels, Path]:
    """(JointSAE, its labels, folder); a one-line error when the folder has no labels.json."""
    from jsae.saes.joint_sae import JointSAE

    path = resolve_sae_dir(sae)
    model = JointSAE.load_from_disk(path)
    if not (path / "labels.json").is_file():
        raise FileNotFoundError(f"{path} has no labels.json, so there are no features to show; label it first: "
                                f"`jsae sae label --sae {path} --capture CAPTURE --layer {model.cfg.metadata.get('layer')}`")
    labels = FeatureLabels.load(path / "labels.json")
    labels.check_sae(model, f"the SAE in {path}")
    return model, labels, path


__all__ = ["METHOD_INFO", "METRICS_FILE", "MethodInfo", "RUN_FILE", "RunDir", "load_labelled_sae", "resolve_sae_dir"]
