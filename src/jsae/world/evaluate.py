"""Quality of a toy VLM on held-out scenes: greedy captions and question answering."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from jsae.hf import padding_side
from jsae.world import grammar
from jsae.world.data import iter_world
from jsae.world.models import check_name, caption_prompt


@torch.no_grad()
def generate_text(model, processor, name: str, images, prompts: list[str], max_new_tokens: int = 48) -> tuple[list[str], list[bool]]:
    """Greedy continuation of ``prompts`` (text after the captioning prompt) for ``images``; returns
    (texts, ended_with_eos)."""
    tok = processor.tokenizer
    texts = [f"{caption_prompt(name, processor)} {p}".rstrip() for p in prompts]
    with padding_side(processor, "left"):
        enc = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    dev = next(model.parameters()).device
    enc = {k: v.to(dev) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    ended = [(row == tok.eos_token_id).any().item() for row in new]
    return tok.batch_decode(new, skip_special_tokens=True), ended


@torch.no_grad()
def answer_questions(model, processor, name: str, images, questions: list[str], describe_first: bool = True,
                     captions: list[str] | None = None) -> list[str]:
    """Answer ``questions`` about ``images`` greedily. With ``describe_first`` (the trained protocol) the
    model first captions the image and the question follows its own caption (``"<caption> : <question>"``);
    otherwise the question follows the image directly."""
    from jsae.world.training import describe_prompt

    if describe_first:
        if captions is None:
            captions, _ = generate_text(model, processor, name, images, [""] * len(images))
        prompts = [describe_prompt(c.strip(), q) for c, q in zip(captions, questions)]
    else:
        prompts = list(questions)
    outs, _ = generate_text(model, processor, name, images, prompts, max_new_tokens=8)
    return [o.strip() for o in outs]


@torch.no_grad()
def caption_cross_entropy(model, processor, name: str, n: int = 100, split: str = "test", seed: int = 0,
                          batch_size: int = 50) -> dict[int, float]:
    """Mean cross-entropy (nats per caption token, ``</s>`` included) of each caption template of ``n``
    held-out scenes after the captioning prompt: how much the model expects each template (a template the
    model has collapsed away from costs several nats; ``log |V|`` is chance)."""
    from jsae.world.training import build_batch

    check_name(name)
    scenes = [s for s, _ in iter_world(split, n, seed)]
    dev = next(model.parameters()).device
    out: dict[int, float] = {}
    for t in range(grammar.N_TEMPLATES):
        tot = cnt = 0.0
        for i in range(0, n, batch_size):
            chunk = scenes[i:i + batch_size]
            enc, labels = build_batch(name, processor, chunk, [("", grammar.caption(s.objects, t)) for s in chunk])
            logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
            lab = labels[:, 1:].to(dev)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab.flatten(), reduction="sum")
            tot += float(ce)
            cnt += float((lab != -100).sum())
        out[t] = round(tot / cnt, 4)
    return out


def score_caption(text: str, objects: list) -> dict:
    """Object-level correctness (type and colour of each object named, at its position when the caption
    gives positions) and hallucination (an object type named that is not in the image)."""
    found = grammar.parse_caption(text)
    names = {o.name for o in objects}
    correct = 0
    named = {f["name"] for f in found}
    types_named = sum(o.name in named for o in objects)
    for o in objects:
        ok = any(f["name"] == o.name and f["color"] == o.color and f["position"] in (None, o.position) for f in found)
        correct += ok
    halluc = any(f["name"] not in names for f in found)
    strict = any(not any(f["name"] == o.name and f["color"] == o.color for o in objects) for f in found)
    full = correct == len(objects) and len(found) == len(objects) and all(
        any(f["name"] == o.name and f["color"] == o.color and f["size"] == o.size and f["position"] == o.position
            for f in found) for o in objects)
    return {"correct": correct, "types_named": types_named, "total": len(objects), "hallucinated": halluc, "hallucinated_strict": strict,
            "exact_all_attributes": full}


def evaluate(model, processor, name: str, n: int = 500, split: str = "test", seed: int = 0, batch_size: int = 100,
             progress: bool = True, examples: int = 0, direct_qa: bool = True) -> dict:
    """Object accuracy of greedy captions, no-hallucination rate and QA accuracy on ``n`` held-out scenes."""
    check_name(name)
    was_training = model.training
    model.eval()
    items = list(iter_world(split, n, seed))
    types_ok = 0
    obj_ok = obj_tot = no_hall = no_hall_strict = exact = eos = 0
    qa_ok = qa_direct_ok = qa_tot = 0
    shown: list[dict] = []
    for i in tqdm(range(0, n, batch_size), desc=f"evaluate {name}", disable=not progress):
        chunk = items[i:i + batch_size]
        scenes = [s for s, _ in chunk]
        caps, ended = generate_text(model, processor, name, [s.image for s in scenes], [""] * len(scenes))
        for s, c, e in zip(scenes, caps, ended):
            r = score_caption(c, s.objects)
            obj_ok += r["correct"]
            types_ok += r["types_named"]
            obj_tot += r["total"]
            no_hall += not r["hallucinated"]
            no_hall_strict += not r["hallucinated_strict"]
            exact += r["exact_all_attributes"]
            eos += e
            if len(shown) < examples:
                shown.append({"truth": grammar.caption(s.objects, 0), "generated": c})
        qs, imgs, ans, own = [], [], [], []
        for (s, rec), c in zip(chunk, caps):
            for qa in rec["qa"]:
                qs.append(qa["question"])
                ans.append(qa["answer"])
                imgs.append(s.image)
                own.append(c)
        outs = answer_questions(model, processor, name, imgs, qs, describe_first=True, captions=own)
        direct = answer_questions(model, processor, name, imgs, qs, describe_first=False) if direct_qa else [None] * len(qs)
        for o, d, a in zip(outs, direct, ans):
            qa_ok += o == a
            qa_direct_ok += d == a
            qa_tot += 1
    if was_training:
        model.train()
    res = {"n_images": n, "object_accuracy": round(obj_ok / obj_tot, 4), "type_recall": round(types_ok / obj_tot, 4),
           "no_hallucination": round(no_hall / n, 4), "no_hallucination_strict": round(no_hall_strict / n, 4),
           "captions_exact": round(exact / n, 4), "captions_ending_with_eos": round(eos / n, 4),
           "qa_accuracy": round(qa_ok / max(1, qa_tot), 4),
           "qa_accuracy_direct": round(qa_direct_ok / max(1, qa_tot), 4) if direct_qa else None,
           "n_questions": qa_tot}
    res["caption_nats_per_template"] = caption_cross_entropy(model, processor, name, n=min(n, 100), split=split,
                                                             seed=seed)
    if examples:
        res["examples"] = shown
    return res
