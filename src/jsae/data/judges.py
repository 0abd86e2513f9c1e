"""Judges: what counts as a concept, a mention and a fluent caption.  :class:`WorldJudge` on the embedded
world (exact ground truth, the grammar as fluency guard), :class:`CaptionJudge` on real data (caption words
as concepts, word matches as mentions, and as fluency guard the perplexity of the generated caption under
the model *without* the image, :func:`text_perplexity`, plus a repetition check)."""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from jsae.correlation import presence_matrix
from jsae.world.concepts import (
    concept_presence,
    fluent,
    is_concept_of,
    mentions,
    world_concepts,
)


class WorldJudge:
    """The embedded world: concepts are object types, categories and colours; presence is exact ground
    truth; a mention is read by the world's caption parser; fluent = the caption parses under its grammar."""

    needs_calibration = False

    def __init__(self) -> None:
        self.concepts = world_concepts()

    def presence(self, items: Sequence[dict]) -> Tensor:
        return concept_presence([it["objects"] for it in items], self.concepts)

    def mentions(self, text: str, concept: str) -> bool:
        return mentions(text, concept)

    def calibrate(self, captions: list[str]) -> None:
        """Nothing to calibrate: the grammar is the standard."""

    def fluency(self, captions: list[str]) -> float:
        return float(np.mean([fluent(c) for c in captions])) if captions else 0.0

    def fluent_each(self, captions: list[str]) -> list[bool]:
        """Strict fluency per caption: it parses completely under one caption template
        (:func:`jsae.world.grammar.parses`)."""
        from jsae.world.grammar import parses

        return [parses(c) for c in captions]

    def hallucinated(self, text: str, item: dict, concept: str) -> bool:
        """The caption names an object type that is neither in the image nor an instance of ``concept``."""
        from jsae.world.grammar import parse_caption

        have = {o["name"] for o in item["objects"]}
        return any(f["name"] not in have and f["name"] != concept and not is_concept_of(f["name"], concept)
                   for f in parse_caption(text))

    def others(self, item: dict, concept: str) -> list[str]:
        """The image's other object types (not ``concept`` nor of its category), for preservation."""
        return sorted({o["name"] for o in item["objects"]} - {concept}
                      - {o["name"] for o in item["objects"] if is_concept_of(o["name"], concept)})


_WORD = re.compile(r"[a-z]+")


def caption_words(text: str) -> set[str]:
    """Lower-case words of a caption, with a plural ``-s``/``-es`` also counted as its singular."""
    words = set(_WORD.findall(text.lower()))
    out = set(words)
    for w in words:
        if len(w) > 3 and w.endswith("es"):
            out.add(w[:-2])
        if len(w) > 2 and w.endswith("s"):
            out.add(w[:-1])
    return out


def distinct_2(text: str) -> float:
    """Fraction of distinct word bigrams (1.0 = no repetition); 1.0 for captions of under 3 words."""
    w = text.split()
    bigrams = list(zip(w, w[1:]))
    return len(set(bigrams)) / len(bigrams) if len(bigrams) >= 2 else 1.0


def distinct_3(text: str) -> float | None:
    """The reference's distinct-3 of one text: distinct word trigrams / word trigrams (1.0 = no repeated
    trigram); ``None`` for a text of under 3 words (no trigram)."""
    w = text.split()
    trigrams = list(zip(w, w[1:], w[2:]))
    return len(set(trigrams)) / len(trigrams) if trigrams else None


def zlib_sizes(text: str) -> tuple[int, int]:
    """``(UTF-8 bytes, zlib-compressed bytes)`` of ``text``: the one measurement behind both repetition ratios
    below, which are reciprocals of each other."""
    raw = text.encode("utf-8")
    return len(raw), len(zlib.compress(raw))


def compression_ratio(text: str) -> float | None:
    """The JSAE reference code's compression ratio (its ``evaluate_repetition``): zlib-compressed bytes / UTF-8
    bytes of the text as given (lower = more repetitive; its stopping rule fires under 0.3); ``None`` for an empty
    text.  The reciprocal of :func:`zlib_ratio`."""
    raw, packed = zlib_sizes(text)
    return packed / raw if raw else None


def zlib_ratio(text: str) -> float | None:
    """The zlib ratio of one text, stripped: UTF-8 bytes / zlib-compressed bytes (higher = more repetitive; about
    1 for a short varied caption), what jsae reports as ``zlib_ratio``; ``None`` for an empty text.  The
    reciprocal of the reference's :func:`compression_ratio`."""
    raw, packed = zlib_sizes(text.strip())
    return raw / packed if raw else None


def text_quality(texts: Iterable[str]) -> dict[str, float | None]:
    """Mean :func:`distinct_3` and :func:`zlib_ratio` over ``texts`` (each over the texts where it is defined;
    ``None`` when it is defined for none)."""
    texts = list(texts)
    out: dict[str, float | None] = {}
    for name, fn in (("distinct_3", distinct_3), ("zlib_ratio", zlib_ratio)):
        vals = [v for v in map(fn, texts) if v is not None]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def concepts_from_captions(captions: list[str], min_count: int = 5, stopwords: Iterable[str] = ()) -> tuple[Tensor, list[str]]:
    """Real data: caption words as concepts -> (presence [N, C] float, words)."""
    stop = {"a", "an", "the", "of", "on", "in", "and", "with", "is", "at", "to", "its", "it", *stopwords}
    tokens = [set(re.findall(r"[a-z]+", c.lower())) - stop for c in captions]
    counts = Counter(w for t in tokens for w in t)
    words = sorted(w for w, n in counts.items() if n >= min_count)
    if not words:
        raise ValueError(f"no caption word occurs {min_count} times; lower min_count or use more captions")
    return presence_matrix(tokens, words), words


def caption_presence(items: Sequence[dict], concepts: list[str]) -> Tensor:
    """[N, C] 0/1: does a row's reference caption(s) have concept word c (plural tolerant)?"""
    y = torch.zeros(len(items), len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for i, it in enumerate(items):
        refs = it.get("captions") or [it["caption"]]
        for w in set().union(*(caption_words(r) for r in refs)):
            if w in index:
                y[i, index[w]] = 1.0
    return y


class CaptionJudge:
    """Real data: concepts are caption words (:func:`concepts_from_captions`); an image
    *contains* a concept when its reference caption has the word; a generated caption *mentions* it on a
    word match (plural tolerant).  Fluency guard (the reference code's perplexity guard, with the VLM
    itself as the language model): a caption is fluent when its perplexity under the model **without the
    image** is at most ``max_perplexity`` (default: ``ratio`` × the 95th percentile of the unsteered calibration
    captions, set by :meth:`calibrate`, so that unsteered captions pass) and its distinct-bigram ratio is at
    least ``min_distinct``."""

    needs_calibration = True

    def __init__(self, concepts: list[str], perplexity: Callable[[list[str]], np.ndarray], *,
                 max_perplexity: float | None = None, ratio: float = 1.5, min_distinct: float = 0.5) -> None:
        if not concepts:
            raise ValueError("CaptionJudge needs at least one concept word")
        if max_perplexity is not None and not (math.isfinite(max_perplexity) and max_perplexity > 1):
            raise ValueError(f"max_perplexity must be a finite number > 1, got {max_perplexity!r}")
        self.concepts, self.perplexity = list(concepts), perplexity
        self.max_perplexity, self.ratio, self.min_distinct = max_perplexity, ratio, min_distinct
        self._fixed = max_perplexity is not None

    def presence(self, items: Sequence[dict]) -> Tensor:
        return caption_presence(items, self.concepts)

    def mentions(self, text: str, concept: str) -> bool:
        return concept in caption_words(text)

    def calibrate(self, captions: list[str]) -> None:
        """Set the perplexity threshold from unsteered captions (unless ``max_perplexity`` was given)."""
        if self._fixed:
            return
        ppl = self.perplexity([c for c in captions if c.strip()])
        if len(ppl) == 0:
            raise ValueError("the unsteered captions are all empty: check the captioning prompt (--prompt)")
        self.max_perplexity = float(self.ratio * np.quantile(ppl, 0.95))

    def fluency(self, captions: list[str]) -> float:
        return float(np.mean(self.fluent_each(captions))) if captions else 0.0

    def hallucinated(self, text: str, item: dict, concept: str) -> bool:
        """The caption names a concept word that none of the image's reference captions has (``concept`` aside)."""
        refs = item.get("captions") or [item["caption"]]
        have = set().union(*(caption_words(r) for r in refs))
        return any(w in caption_words(text) and w not in have and w != concept for w in self.concepts)

    def fluent_each(self, captions: list[str]) -> list[bool]:
        """Per caption: perplexity without the image at most the threshold and distinct-bigram ratio at least
        ``min_distinct`` (:meth:`calibrate` first)."""
        if not captions:
            return []
        if self.max_perplexity is None:
            raise RuntimeError("CaptionJudge.calibrate(unsteered_captions) must run before fluency()")
        ppl = np.full(len(captions), np.inf)
        nonempty = [i for i, c in enumerate(captions) if c.strip()]
        if nonempty:
            ppl[nonempty] = self.perplexity([captions[i] for i in nonempty])
        return [bool(p <= self.max_perplexity and distinct_2(c) >= self.min_distinct) for p, c in zip(ppl, captions)]

    def others(self, item: dict, concept: str) -> list[str]:
        refs = item.get("captions") or [item["caption"]]
        words = set().union(*(caption_words(r) for r in refs))
        return sorted(w for w in self.concepts if w in words and w != concept)


Judge = WorldJudge | CaptionJudge


@torch.no_grad()
def text_perplexity(model: Any, processor: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Perplexity of each text under the VLM's language model alone (no image): exp of the mean
    next-token loss over the text's tokens after the first."""
    from jsae.hf import padding_side, unwrap

    hf = unwrap(model)
    tok = getattr(processor, "tokenizer", processor)
    dev = next(hf.parameters()).device
    out: list[float] = []
    with padding_side(processor, "right"):
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True).to(dev)
            logits = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            mask = enc["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), enc["input_ids"][:, 1:],
                                                    reduction="none")
            out += torch.exp((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().tolist()
    return np.array(out)


__all__ = ["CaptionJudge", "Judge", "WorldJudge", "caption_presence", "compression_ratio", "concepts_from_captions", "caption_words", "distinct_2", "distinct_3",
           "text_perplexity", "text_quality", "zlib_ratio", "zlib_sizes"]
