"""The reference code's caption metrics and experiment table.

The JSAE reference evaluates a steered caption by: a keyword hit (a keyword is a case-insensitive
substring of the caption), the SBERT similarity gain to a target sentence (cosine of the steered caption's
sentence embedding with the target's minus that of the unsteered caption), the GPT-2 perplexity of the caption,
and repetition (distinct-3 and zlib ratio, :func:`jsae.data.judges.text_quality`).  Its experiments are a
table, one row per experiment: a layer, latent ids, keywords, a target sentence and image ids
(:func:`read_experiment_table`, :func:`write_experiment_table`).

:class:`SentenceSimilarity` needs ``sentence-transformers`` (``pip install 'jsae[similarity]'``);
:class:`LMPerplexity` needs only transformers.  Both load a hub name or a local folder, never run remote code,
and fail with a one-line ``OSError`` when the model is neither local nor reachable.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jsae.data.judges import text_quality
from jsae.files import write_atomic

COLUMNS = ("name", "layer", "latents", "keywords", "target", "image_ids")


# ---------------------------------------------------------------------------------------------------------------
# the experiment table
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """One row of the reference's experiment table: steer ``latents`` of the SAE at ``layer`` on the images
    ``image_ids``; success is a caption with one of ``keywords`` and closer to ``target``."""

    name: str
    layer: int
    latents: list[int]
    keywords: list[str]
    target: str = ""
    image_ids: list[str] = field(default_factory=list)


def _split_list(value: str) -> list[str]:
    """A list cell: a JSON list (``[1, 2]``), else items separated by ``;`` (or by ``,`` when there is no ``;``)."""
    value = (value or "").strip()
    if not value:
        return []
    if value.startswith("["):
        items = json.loads(value)  # a ValueError (JSONDecodeError) the caller words
        if not isinstance(items, list):
            raise ValueError("not a JSON list")
        return [str(x).strip() for x in items if str(x).strip()]
    sep = ";" if ";" in value else ","
    return [x.strip() for x in value.split(sep) if x.strip()]


def _as_int(value: Any) -> int:
    """``12``, ``"12"`` or ``"12.0"`` (a spreadsheet's export) -> 12; anything else is a ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    s = str(value).strip()
    try:
        return int(s)
    except ValueError:
        f = float(s)  # ValueError for non-numbers
        if not (math.isfinite(f) and f.is_integer()):
            raise ValueError(s) from None
        return int(f)


def _parse_row(row: dict[str, str], where: str) -> Experiment:
    name = (row.get("name") or "").strip()
    if not name:
        raise ValueError(f"{where}: the name is empty; give every experiment a name")
    where = f"{where}, experiment {name!r}"
    layer_s = (row.get("layer") or "").strip()
    try:
        layer = _as_int(layer_s)
    except ValueError:
        raise ValueError(f"{where}: layer {layer_s!r} is not an integer; write the layer index, e.g. 12") from None
    try:
        latent_items = _split_list(row.get("latents") or "")
    except ValueError:
        raise ValueError(f"{where}: latents {row.get('latents')!r} is not a valid JSON list; "
                         "write ids separated by ';', e.g. 12;345") from None
    latents = []
    for item in latent_items:
        try:
            latent = _as_int(item)
        except ValueError:
            raise ValueError(f"{where}: latent id {item!r} is not an integer; write ids separated by ';', "
                             "e.g. 12;345") from None
        if latent < 0:
            raise ValueError(f"{where}: latent id {latent} is negative; latent ids are indices >= 0")
        latents.append(latent)
    if not latents:
        raise ValueError(f"{where}: no latent ids; write the ids to steer separated by ';', e.g. 12;345")
    try:
        keywords = _split_list(row.get("keywords") or "")
        image_ids = _split_list(row.get("image_ids") or "")
    except ValueError:
        raise ValueError(f"{where}: a list cell is not a valid JSON list; write items separated by ';'") from None
    if not keywords:
        raise ValueError(f"{where}: keywords is empty; write the words a steered caption should contain, "
                         "separated by ';', e.g. dog;puppy")
    return Experiment(name=name, layer=layer, latents=latents, keywords=keywords,
                      target=(row.get("target") or "").strip(), image_ids=image_ids)


def read_experiment_table(path: str | Path) -> list[Experiment]:
    """The experiments of a CSV with columns ``name,layer,latents,keywords,target,image_ids`` (others are
    ignored).  List cells hold items separated by ``;`` (or ``,`` in a quoted cell without ``;``) or a JSON
    list such as ``[1, 2]``.  Raises a one-line ``ValueError`` for a missing file, a missing column, a
    non-integer layer or latent id, or empty keywords."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment table {str(path)!r} not found; pass the path of a CSV with columns "
                         f"{','.join(COLUMNS)}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"experiment table {str(path)!r} lacks column(s) {','.join(missing)}; "
                             f"the header must name {','.join(COLUMNS)}")
        reader.fieldnames = header
        out = []
        for i, row in enumerate(reader, start=1):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            out.append(_parse_row(row, f"{path.name} row {i} (line {reader.line_num})"))
    return out


def _join_list(items: Sequence[Any]) -> str:
    """A list cell :func:`_split_list` reads back: ``a;b``, or a JSON list when an item holds a separator."""
    items = [str(x) for x in items]
    if any(not x.strip() or x != x.strip() or ";" in x or "," in x or x.startswith("[") for x in items):
        return json.dumps(items)
    return ";".join(items)


def write_experiment_table(experiments: Iterable[Experiment], path: str | Path) -> Path:
    """Write ``experiments`` as the CSV :func:`read_experiment_table` reads (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for e in experiments:
        writer.writerow([e.name, int(e.layer), _join_list([int(x) for x in e.latents]), _join_list(e.keywords),
                         e.target, _join_list(e.image_ids)])
    return write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# keyword hits
# ---------------------------------------------------------------------------------------------------------------


def keyword_hit(text: str, keywords: Iterable[str]) -> bool:
    """The reference's keyword hit: some keyword is a case-insensitive substring of ``text``."""
    low = text.lower()
    return any(k.lower() in low for k in keywords if k)


def keyword_hit_rate(texts: Sequence[str], keywords: Iterable[str]) -> float:
    """Fraction of ``texts`` with a :func:`keyword_hit` (NaN for no texts)."""
    keywords = list(keywords)
    texts = list(texts)
    return float(np.mean([keyword_hit(t, keywords) for t in texts])) if texts else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# models: sentence similarity and perplexity
# ---------------------------------------------------------------------------------------------------------------


def _offline() -> bool:
    try:
        import huggingface_hub.constants as hc

        if getattr(hc, "HF_HUB_OFFLINE", False):
            return True
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(err: BaseException, limit: int = 200) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line[:limit]}"


def _load_error(what: str, name: str, flag: str, err: BaseException) -> OSError:
    """The one-line error for a model that would not load: a local folder's reason, or offline/unknown."""
    if os.path.isdir(name):
        return OSError(f"could not load {what} from the folder {name!r} ({_first_line(err)}); "
                       f"pass a folder saved with save_pretrained via {flag}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:  # a path, not a hub id
        return OSError(f"could not load {what} {name!r}: no such folder; pass an existing folder with {flag}")
    why = "offline (HF_HUB_OFFLINE) and not in the Hugging Face cache" if _offline() else "offline or unknown"
    return OSError(f"could not load {what} {name!r} ({why}); pass a local path with {flag}")


class SentenceSimilarity:
    """Cosine similarity of sentence embeddings (the reference's SBERT ``all-MiniLM-L6-v2``): a
    sentence-transformers model by hub name or local folder, loaded once; never runs remote code."""

    def __init__(self, model_name_or_path: str | Path = "sentence-transformers/all-MiniLM-L6-v2", device: str = "cpu",
                 batch_size: int = 64) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError("SentenceSimilarity needs sentence-transformers: pip install 'jsae[similarity]'") from None
        self.name, self.device, self.batch_size = str(model_name_or_path), device, int(batch_size)
        try:
            self.model = SentenceTransformer(self.name, device=device, trust_remote_code=False,
                                             local_files_only=_offline() and not os.path.isdir(self.name))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise _load_error("sentence-embedding model", self.name, "--similarity-model", err) from None
        self.model.eval()

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def similarity(self, texts: Sequence[str], target: str) -> np.ndarray:
        """Cosine similarity of each text to ``target`` -> float array [len(texts)]."""
        texts = list(texts)
        if not texts:
            return np.zeros(0, dtype=np.float32)
        emb = self._embed(texts + [target])
        return emb[:-1] @ emb[-1]

    def gain(self, steered: Sequence[str], unsteered: Sequence[str], target: str) -> np.ndarray:
        """Per pair: similarity(steered, target) - similarity(unsteered, target) (the reference's
        ``sim_gain``; positive = the steered caption is closer to the target)."""
        steered, unsteered = list(steered), list(unsteered)
        if len(steered) != len(unsteered):
            raise ValueError(f"gain needs paired captions: {len(steered)} steered vs {len(unsteered)} unsteered")
        if not steered:
            return np.zeros(0, dtype=np.float32)
        sims = self.similarity(steered + unsteered, target)
        return sims[:len(steered)] - sims[len(steered):]


class LMPerplexity:
    """Perplexity of texts under a causal language model (the reference's GPT-2): exp of the mean
    next-token loss over each text's tokens after the first (the tokenizer's own special tokens included,
    as the reference calls it); NaN for a text of fewer than 2 tokens.  Batches are right-padded by hand
    and masked, so a tokenizer without a pad token (GPT-2) works; long texts are cut at the model's context."""

    def __init__(self, model_name_or_path: str | Path = "gpt2", device: str = "cpu", batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.device, self.batch_size = str(model_name_or_path), device, int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        common: dict[str, Any] = dict(trust_remote_code=False, local_files_only=_offline() and not os.path.isdir(self.name))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name, **common)
            self.model = AutoModelForCausalLM.from_pretrained(self.name, use_safetensors=True, dtype=torch.float32,
                                                              **common)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise _load_error("language model", self.name, "--perplexity-model", err) from None
        self.model.to(device).eval()
        cfg = self.model.config
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.full(len(texts), np.nan, dtype=np.float64)
        ids = [list(self.tokenizer(t)["input_ids"])[:self.max_length] for t in texts]
        todo = [i for i, x in enumerate(ids) if len(x) >= 2]
        with torch.no_grad():
            for b in range(0, len(todo), self.batch_size):
                rows = todo[b:b + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                inp = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):
                    inp[r, :len(ids[i])] = torch.tensor(ids[i])
                    mask[r, :len(ids[i])] = 1
                inp, mask = inp.to(self.device), mask.to(self.device)
                logits = self.model(input_ids=inp, attention_mask=mask).logits.float()
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inp[:, 1:], reduction="none")
                m = mask[:, 1:].float()
                ppl = torch.exp((nll * m).sum(1) / m.sum(1))
                out[rows] = ppl.double().cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------------------------
# all together
# ---------------------------------------------------------------------------------------------------------------


def _finite_mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def caption_metrics(steered: Sequence[str], unsteered: Sequence[str], keywords: Sequence[str], target: str | None = None,
                    similarity: SentenceSimilarity | None = None,
                    perplexity: LMPerplexity | None = None) -> dict[str, float | int | None]:
    """The reference's metrics of paired steered / unsteered captions (pair i = the same image):

    - ``keyword_hit_rate_steered`` / ``_unsteered`` (:func:`keyword_hit_rate`), ``keyword_hit_gain``;
    - ``similarity_gain`` (mean :meth:`SentenceSimilarity.gain` to ``target``) and ``similarity_steered`` /
      ``_unsteered`` (mean similarities), when ``similarity`` is given (then ``target`` is required);
    - ``perplexity_steered`` / ``_unsteered``: mean perplexity over the captions where it is finite, when
      ``perplexity`` is given;
    - ``distinct_3_steered`` / ``_unsteered`` and ``zlib_ratio_steered`` / ``_unsteered``
      (:func:`jsae.data.judges.text_quality`; ``None`` where undefined);
    - ``n``: the number of pairs."""
    steered, unsteered = list(steered), list(unsteered)
    if len(steered) != len(unsteered):
        raise ValueError(f"caption_metrics needs paired captions: {len(steered)} steered vs {len(unsteered)} unsteered")
    keywords = [k for k in keywords if k]
    if not keywords:
        raise ValueError("caption_metrics needs at least one keyword")
    out: dict[str, float | int | None] = {"n": len(steered)}
    out["keyword_hit_rate_steered"] = keyword_hit_rate(steered, keywords)
    out["keyword_hit_rate_unsteered"] = keyword_hit_rate(unsteered, keywords)
    out["keyword_hit_gain"] = out["keyword_hit_rate_steered"] - out["keyword_hit_rate_unsteered"]
    if similarity is not None:
        if not target:
            raise ValueError("the similarity gain needs the experiment's target sentence: pass target=")
        sims = similarity.similarity(steered + unsteered, target)
        out["similarity_steered"] = _finite_mean(sims[:len(steered)])
        out["similarity_unsteered"] = _finite_mean(sims[len(steered):])
        out["similarity_gain"] = _finite_mean(sims[:len(steered)] - sims[len(steered):])
    if perplexity is not None:
        ppl = perplexity(steered + unsteered)
        out["perplexity_steered"] = _finite_mean(ppl[:len(steered)])
        out["perplexity_unsteered"] = _finite_mean(ppl[len(steered):])
    for tag, texts in (("steered", steered), ("unsteered", unsteered)):
        for key, value in text_quality(texts).items():
            out[f"{key}_{tag}"] = value
    return out


__all__ = ["COLUMNS", "Experiment", "LMPerplexity", "SentenceSimilarity", "caption_metrics", "keyword_hit",
           "keyword_hit_rate", "read_experiment_table", "write_experiment_table"]
