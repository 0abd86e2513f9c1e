"""The world's concepts and how captions are read against them: object types, categories and colours,
their presence in an image (exact ground truth), a caption's mention of one (the world's grammar) and
whether a caption is fluent (it parses under the grammar)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def world_concepts() -> list[str]:
    from jsae.world.scenes import CATEGORIES, COLORS, TYPES

    return list(TYPES) + list(CATEGORIES) + list(COLORS)


def concept_presence(objects: Sequence[Sequence[dict]], concepts: list[str]) -> Tensor:
    """[N, C] 0/1: does image i contain concept c (an object of that type, category or colour)?"""
    y = torch.zeros(len(objects), len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for i, objs in enumerate(objects):
        for o in objs:
            for key in ("name", "category", "color"):
                if o.get(key) in index:
                    y[i, index[o[key]]] = 1.0
    return y


def mentions(text: str, concept: str) -> bool:
    """Does a caption mention ``concept`` (a type, a category or a colour) under the world's grammar?"""
    from jsae.world.grammar import parse_caption
    from jsae.world.scenes import TYPE_TO_CATEGORY

    words = text.replace(",", " ").split()
    if concept in words:
        return True
    found = parse_caption(text)
    return any(TYPE_TO_CATEGORY.get(f["name"]) == concept or f["color"] == concept for f in found)


def fluent(text: str) -> bool:
    """The caption still parses under the world's grammar: it names an object and uses only its words."""
    from jsae.world.grammar import parse_caption, vocabulary

    vocab = set(vocabulary())
    return bool(parse_caption(text)) and all(w in vocab for w in text.replace(",", " , ").split())


def is_concept_of(obj_name: str, concept: str) -> bool:
    """Is an object of type ``obj_name`` an instance of the category ``concept``?"""
    from jsae.world.scenes import TYPE_TO_CATEGORY

    return TYPE_TO_CATEGORY.get(obj_name) == concept


__all__ = ["concept_presence", "fluent", "is_concept_of", "mentions", "world_concepts"]
