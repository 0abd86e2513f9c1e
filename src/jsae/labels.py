"""Feature → concept labels from held-out paired codes.

For every latent j and concept c, the Pearson correlation of the latent's *image* code ``z_v[:, j]``
and of its *caption* code ``z_t[:, j]`` with the concept's presence ``y[:, c]`` over held-out pairs.
A latent's label is the concept with the highest correlation in either modality (when it reaches
``min_corr``); its **purity** is the fraction of its activation mass that falls on pairs containing
that concept (averaged over the modalities where it fires); its **kind** is ``"shared"`` when it
correlates with the concept in both modalities, ``"vision-only"`` / ``"text-only"`` otherwise.

Concepts come from the world's ground truth, or, on real data, from caption words
(:func:`jsae.data.judges.concepts_from_captions`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from jsae.correlation import correlation_matrix
from jsae.guards import shape_checked

Kind = Literal["shared", "vision-only", "text-only", "unlabelled"]


@dataclass
class FeatureLabel:
    feature: int
    label: str | None
    kind: Kind
    purity: float
    vision_corr: float
    text_corr: float


@dataclass
class FeatureLabels:
    """All labels of one SAE, with lookups by concept."""

    labels: list[FeatureLabel]
    concepts: list[str]
    data: dict[str, Any] | None = None  # the labelling data (jsae.data.sources ``describe``: kind, fingerprint, ...)
    provenance: dict[str, Any] | None = None  # the labelled SAE's record (jsae.provenance.sae_record) and the capture's

    def check_sae(self, sae: Any, where: str = "this SAE") -> None:
        """One-line :class:`~jsae.provenance.ProvenanceError` when these labels were made for an SAE of another
        model, layer or hook than ``sae`` (labels without a record are not checked), and a one-line ``ValueError``
        when they name a feature the SAE does not have."""
        from jsae.provenance import check_same, sae_record

        d_sae = getattr(getattr(sae, "cfg", None), "d_sae", None)
        bad = sorted(lab.feature for lab in self.labels if not isinstance(lab.feature, int) or lab.feature < 0
                     or (d_sae is not None and lab.feature >= d_sae))
        if bad:
            raise ValueError(f"these labels name feature(s) {bad[:5]} but {where} has features 0..{(d_sae or 0) - 1}; "
                             "the labels belong to another SAE: label this SAE itself (`jsae sae label`)")
        found = (self.provenance or {}).get("sae")
        if found:
            check_same({k: v for k, v in found.items() if k != "data"},
                       {k: v for k, v in sae_record(sae).items() if k != "data"}, "this labels file", where,
                       "label this SAE itself (`jsae sae label`)")

    def features_for(self, concept: str, kinds: Iterable[str] = ("shared",)) -> list[int]:
        """Latents labelled ``concept`` (shared ones by default), strongest first."""
        kinds = tuple(kinds)
        hits = [lab for lab in self.labels if lab.label == concept and lab.kind in kinds]
        if not hits:
            known = sorted({lab.label for lab in self.labels if lab.label and lab.kind in kinds})
            raise ValueError(f"no {'/'.join(kinds)} feature is labelled {concept!r}; labelled concepts: {known}")
        return [lab.feature for lab in sorted(hits, key=lambda lab: -(lab.vision_corr + lab.text_corr))]

    def counts(self) -> dict[str, int]:
        return dict(Counter(lab.kind for lab in self.labels))

    def save(self, path: str | Path) -> None:
        """``labels.json`` (atomic): the concepts, one record per feature and, when known, the labelling data."""
        from jsae.files import write_atomic

        out: dict[str, Any] = {"concepts": self.concepts, "labels": [asdict(lab) for lab in self.labels]}
        if self.data is not None:
            out["data"] = self.data
        if self.provenance is not None:
            out["provenance"] = self.provenance
        write_atomic(path, json.dumps(out, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureLabels":
        try:
            data = json.loads(Path(path).read_text())
            return cls([FeatureLabel(**lab) for lab in data["labels"]], data["concepts"], data.get("data"),
                       data.get("provenance"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable jsae labels file ({str(exc).splitlines()[0]}); label the SAE "
                             "again with `jsae sae label`") from None


@shape_checked
def label_features(
    z_vision: Float[Tensor, "n d_sae"],
    z_text: Float[Tensor, "n d_sae"],
    concepts: Float[Tensor, "n c"],
    concept_names: list[str],
    min_corr: float = 0.3,
    data: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> FeatureLabels:
    """Label every latent from held-out paired codes and concept presence (0/1 per pair); ``data`` and
    ``provenance`` (the SAE's and the capture's records) are stored with the labels."""
    if len(concept_names) != concepts.shape[1]:
        raise ValueError(f"{len(concept_names)} concept names for {concepts.shape[1]} concept columns")
    if not 0 < min_corr < 1:
        raise ValueError(f"min_corr must be in (0, 1), got {min_corr}")
    cv, ct = correlation_matrix(z_vision, concepts), correlation_matrix(z_text, concepts)
    best = torch.maximum(cv, ct)
    best_val, best_c = best.max(dim=1)
    y = concepts.double()
    labels = []
    for j in range(z_vision.shape[1]):
        c = int(best_c[j])
        if best_val[j] < min_corr:
            labels.append(FeatureLabel(j, None, "unlabelled", 0.0, float(cv[j].max()), float(ct[j].max())))
            continue
        v_ok, t_ok = bool(cv[j, c] >= min_corr), bool(ct[j, c] >= min_corr)
        kind: Kind = "shared" if v_ok and t_ok else "vision-only" if v_ok else "text-only"
        purities = []
        for z in (z_vision[:, j], z_text[:, j]):
            mass = z.double().clamp(min=0)
            if mass.sum() > 0:
                purities.append(float((mass * y[:, c]).sum() / mass.sum()))
        labels.append(FeatureLabel(j, concept_names[c], kind, sum(purities) / max(len(purities), 1),
                                   float(cv[j, c]), float(ct[j, c])))
    return FeatureLabels(labels, list(concept_names), data, provenance)


def load_labels(source: Any, sae_id: str | None = None) -> FeatureLabels:
    """The feature labels that come with an SAE: ``source`` is a release name (``"jsae-shapes-llava-l4"``, with
    ``sae_id`` when the release holds several SAEs), an SAE folder (holding ``labels.json``) or a loaded SAE
    (``JointSAE.from_pretrained(release)`` / ``JointSAE.load_from_disk(folder)`` remember where they came from).
    One-line errors when there are no labels."""
    from jsae.releases.registry import release_file

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        path = Path(source) / "labels.json"
        if not path.is_file():
            raise FileNotFoundError(f"{source} has no labels.json; label the SAE first: `jsae sae label --sae {source} ...`")
        return FeatureLabels.load(path)
    if isinstance(source, str):
        return FeatureLabels.load(release_file(source, sae_id, "labels.json"))
    release = getattr(source, "source_release", None)
    if release is not None:
        return FeatureLabels.load(release_file(release[0], release[1], "labels.json"))
    folder = getattr(source, "source_dir", None)
    if folder is not None:
        return load_labels(folder)
    raise ValueError(f"cannot tell where this {type(source).__name__} came from; pass its release name or folder "
                     "(load_labels('jsae-shapes-llava-l4') or load_labels('path/to/sae'))")
