"""Caption grammar, question–answer pairs and a caption parser for evaluation.

Every caption template names each object with the phrase ``{size} {colour} {type}``; templates differ in
framing, in whether they give positions, and in their use of category words ("food", "animal"). Template
0 is the canonical caption the toy VLMs are trained to produce.
"""

from __future__ import annotations

import re

import numpy as np

from jsae.world.scenes import CATEGORIES, COLORS, POSITIONS, SIZES, TYPES, TYPE_TO_CATEGORY, Scene, SceneObject

NUMBERS = ("zero", "one", "two", "three", "four")
PLURAL = {"food": "foods", "animal": "animals"}
N_TEMPLATES = 6


def _np(o: SceneObject) -> str:
    return f"a {o.size} {o.color} {o.name}"


def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(objs: list[SceneObject]) -> str:
    parts = []
    for cat in CATEGORIES:
        k = sum(o.category == cat for o in objs)
        if k:
            parts.append(f"{NUMBERS[k]} {cat if k == 1 else PLURAL[cat]}")
    return " and ".join(parts)


def caption(objects: list[SceneObject], template: int = 0) -> str:
    """Caption of a list of objects (in reading order) with template ``template`` (0 = canonical)."""
    objs = list(objects)
    if template == 0:
        return _join([f"{_np(o)} at the {o.position}" for o in objs])
    if template == 1:
        return "there is " + _join([f"{_np(o)} at the {o.position}" for o in objs])
    if template == 2:
        return _count_phrase(objs) + " : " + _join([f"{_np(o)} at the {o.position}" for o in objs])
    if template == 3:
        return _join([f"the {o.category} at the {o.position} is {_np(o)}" for o in objs])
    if template == 4:
        return _join([_np(o) for o in objs])
    if template == 5:
        return _join([f"at the {o.position} there is {_np(o)} , {_art(o.category)} {o.category}" for o in objs])
    raise ValueError(f"template must be in [0, {N_TEMPLATES - 1}], got {template}")


#: what a patch that shows no object is called in a word picture
NOTHING = "nothing"


def word_picture(scene: Scene, rng: np.random.Generator, grid: int = 6, noise: float = 0.02,
                 min_fraction: float = 0.1) -> list[str]:
    """A scene written out in words, one word per patch of a ``grid × grid`` grid in reading order (the order of
    a VLM's image tokens): for a patch that shows an object (:meth:`Scene.patch_owner`), its type or its colour
    (each object's patches alternate between the two from a random start, so both are always written), else
    ``nothing``; a ``noise`` share of the object words is replaced by a random type or colour word.

    This is the world's text that lets a text-only language model learn to read a picture from words — what a
    real LLM has read in its pretraining corpus before a projector learns to write image tokens into it."""
    owner = scene.patch_owner(grid, min_fraction)
    vocab = list(TYPES) + list(COLORS)
    words = [NOTHING] * len(owner)
    for k, o in enumerate(scene.objects):
        patches = np.flatnonzero(owner == k)
        start = int(rng.integers(2))
        for j, p in enumerate(rng.permutation(patches)):
            words[int(p)] = (o.name, o.color)[(j + start) % 2]
            if noise and rng.random() < noise:
                words[int(p)] = vocab[int(rng.integers(len(vocab)))]
    return words


def all_captions(scene: Scene) -> list[str]:
    return [caption(scene.objects, t) for t in range(N_TEMPLATES)]


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every well-posed question about the scene with its exact answer."""
    objs = scene.objects
    qa: list[tuple[str, str]] = []
    for o in objs:
        if sum(p.name == o.name for p in objs) == 1:
            qa.append((f"what color is the {o.name} ?", o.color))
            qa.append((f"what size is the {o.name} ?", o.size))
            qa.append((f"where is the {o.name} ?", o.position))
        if sum(p.category == o.category for p in objs) == 1:
            qa.append((f"what color is the {o.category} ?", o.color))
    by_pos = {o.position: o for o in objs}
    for pos in POSITIONS:
        qa.append((f"what is at the {pos} ?", _np(by_pos[pos]) if pos in by_pos else "nothing"))
    for cat in CATEGORIES:
        qa.append((f"how many {PLURAL[cat]} are there ?", NUMBERS[sum(o.category == cat for o in objs)]))
    for t in TYPES:
        qa.append((f"is there a {t} ?", "yes" if any(o.name == t for o in objs) else "no"))
    return qa


def sample_questions(scene: Scene, k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``k`` distinct questions, balanced over question kinds (every kind equally likely first)."""
    qa = questions(scene)
    kinds: dict[str, list[tuple[str, str]]] = {}
    for q, a in qa:
        kinds.setdefault(" ".join(q.split()[:2]), []).append((q, a))
    keys = sorted(kinds)
    out: list[tuple[str, str]] = []
    order = rng.permutation(len(keys))
    for i in order:
        pool = kinds[keys[i]]
        out.append(pool[int(rng.integers(len(pool)))])
        if len(out) == k:
            break
    return out


def parse_caption(text: str) -> list[dict]:
    """Objects named in a caption: every ``{size}? {colour}? {type}`` phrase, with the position that
    follows it (``at the <position>``) when there is one, else the position that precedes it."""
    words = text.replace(",", " , ").split()
    found: list[dict] = []
    for i, w in enumerate(words):
        if w not in TYPE_TO_CATEGORY:
            continue
        color = words[i - 1] if i >= 1 and words[i - 1] in COLORS else None
        j = i - 1 if color else i
        size = words[j - 1] if j >= 1 and words[j - 1] in SIZES else None
        pos = None
        tail = " ".join(words[i + 1:i + 5])
        for p in POSITIONS:
            if tail.startswith(f"at the {p}"):
                pos = p
        found.append({"name": w, "color": color, "size": size, "position": pos})
    return found


def _alt(words) -> str:
    return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")"


def _template_patterns() -> list[re.Pattern]:
    np_ = f"a (?:{_alt(SIZES)}) (?:{_alt(COLORS)}) (?P<type>{_alt(TYPES)})"
    pos = _alt(POSITIONS)
    cat = _alt(CATEGORIES)
    items = [f"{np_} at the {pos}", f"{np_} at the {pos}", None, f"the (?P<cat>{cat}) at the {pos} is {np_}", np_,
             f"at the {pos} there is {np_} , (?:a|an) (?P<cat>{cat})"]
    count = f"(?:{_alt(NUMBERS[1:])}) (?:{_alt(list(CATEGORIES) + list(PLURAL.values()))})"
    out = []
    for t, item in enumerate(items):
        item = item or items[0]
        plain = re.sub(r"\(\?P<\w+>", "(?:", item)
        join = f"{plain}(?: , {plain})* and {plain}|{plain}"
        prefix = {1: "there is ", 2: f"{count}(?: and {count})? : "}.get(t, "")
        out.append(re.compile(f"^{prefix}(?:{join})$"))
    return out


_PATTERNS: list[re.Pattern] | None = None


def parses(text: str) -> bool:
    """Strict fluency: ``text`` is a complete caption of one of the templates (every object phrase complete,
    the joins right, at most four objects at distinct positions, every category word the category of its
    object), not merely a string that names an object."""
    global _PATTERNS
    if _PATTERNS is None:
        _PATTERNS = _template_patterns()
    t = " ".join(text.replace(",", " , ").split())
    if not any(p.match(t) for p in _PATTERNS):
        return False
    found = parse_caption(t)
    if not 1 <= len(found) <= len(POSITIONS):
        return False
    positions = [f["position"] for f in found if f["position"]]
    if len(positions) != len(set(positions)):
        return False
    words = t.split()
    for i, w in enumerate(words):  # "the food at ... is a ... cake" / "there is a ... cake , a food": categories agree
        if w in CATEGORIES:
            near = [x for x in (words[i + 6:i + 10] if i >= 1 and words[i - 1] == "the" else words[max(0, i - 4):i])
                    if x in TYPE_TO_CATEGORY]
            if near and TYPE_TO_CATEGORY[near[-1] if words[i - 1] != "the" else near[0]] != w:
                return False
    return True


def vocabulary() -> list[str]:
    """Every word the grammar can produce (captions, questions, answers), sorted."""
    words = {"a", "at", "the", "and", ",", ":", "?", "there", "is", "what", "color", "size", "where", "how",
             "many", "are", "nothing", "yes", "no", "of", "with", "image", "in", "an", "picture", "objects", "object",
             "user", "assistant", "describe"}  # the last three: the toy VLMs' chat template and captioning prompt
    words |= set(NUMBERS) | set(PLURAL.values()) | set(CATEGORIES) | set(TYPES) | set(COLORS) | set(SIZES)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)
