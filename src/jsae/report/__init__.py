"""What people look at, read from a run directory (:mod:`jsae.report.rundir`): markdown and plots
(:mod:`jsae.report.plots`), the feature browser (:mod:`jsae.report.browser`) and the Neuronpedia export
(:mod:`jsae.report.neuronpedia`)."""

from __future__ import annotations

from typing import Any, Sequence


def figure_bands(m: dict[str, Any]) -> tuple[str, dict, str | None, dict | None]:
    """What ``dose_response.png`` draws from a run's metrics: the steering bands of its first position set and the
    suppression bands at the same positions when suppression was measured there (else at its first positions):
    ``(position, steering bands, suppression position or None, suppression bands or None)``."""
    all_bands = m["summary"].get("bands", {})
    pos = (m.get("config", {}).get("positions") or ["image"])[0]
    suppression = all_bands.get("suppression", {})
    sup_pos = pos if pos in suppression else next(iter(suppression), None)
    return pos, all_bands.get("steering", {}).get(pos, {}), sup_pos, suppression.get(sup_pos) if sup_pos else None


def write_run_report(run: Any, vlm: Any, pairs: Sequence[tuple[Any, str]], n_browser_pairs: int = 200) -> None:
    """``dose_response.png``, ``features.html`` (every joint SAE of the run — each method at each swept layer, one
    selector to switch — on the first ``n_browser_pairs`` of ``pairs``) and ``report.md`` of a protocol run, read
    from its directory (:class:`jsae.report.rundir.RunDir`) after its ``metrics.json`` is written (read once).

    Two parts, shared with a forked second process where the machine has a core for it
    (:func:`jsae.parallel.forked_map`): the figure, ``report.md`` and the browser's sections of the first half of
    the layers; the sections of the other half (one process: every section in the first part).  The files are the
    same either way."""
    from jsae.parallel import forked_map, workers
    from jsae.report.browser import browser_page
    from jsae.report.rundir import METHOD_INFO

    m = run.metrics()
    layers = m["layers"]
    joint = [name for name in m.get("methods", ["jsae"]) if name in METHOD_INFO and METHOD_INFO[name].joint
             and all(run.sae_dir(name, L).is_dir() for L in layers)]
    n = workers()
    cut = (len(layers) + 1) // 2 if n > 1 else len(layers)  # one process: one pass of the VLM over every layer
    halves = [layers[:cut], layers[cut:]]

    def part(k: int, _: int) -> dict[str, tuple[str, int]]:
        if k == 0:
            _write_figure_and_markdown(run, m)
        return _browser_sections(run, m, vlm, pairs[:n_browser_pairs], joint, halves[k])

    rendered: dict[str, tuple[str, int]] = {}
    for sections in forked_map(part, [(0, 1), (1, 2)], n):
        rendered.update(sections)
    browser_page({f"{name} · layer {L}": rendered[f"{name} · layer {L}"] for name in joint for L in layers},
                 run.path / "features.html",
                 title=f"{m['model']}: features of every joint SAE of the run (saes/<method>/layer_<L>)")


def _write_figure_and_markdown(run: Any, m: dict[str, Any]) -> None:
    from jsae.files import write_atomic
    from jsae.report.markdown import protocol_report
    from jsae.report.plots import plot_dose_response

    pos, bands, sup_pos, sup_bands = figure_bands(m)
    if bands:
        plot_dose_response(bands, m["n_layers"], run.path / "dose_response.png",
                           title=f"{m['model']}: steering at {pos}, suppression at {sup_pos or '–'} (means over concepts; "
                                 "the other position sets are in report.md)",
                           xlabel="absolute α" if m.get("config", {}).get("alphas") else
                           "strength (× mean per-token image-state norm)",
                           suppression=sup_bands)
    write_atomic(run.path / "report.md", protocol_report(m))


def _browser_sections(run: Any, m: dict[str, Any], vlm: Any, pairs: Sequence[tuple[Any, str]], joint: list[str],
                      layers: list[int]) -> dict[str, tuple[str, int]]:
    """The feature browser's sections (rendered HTML, :func:`jsae.report.browser.browser_section`) of every joint
    method at ``layers``, from one pass of the VLM over ``pairs`` up to the last of them."""
    from jsae.report.browser import browser_features, browser_section, token_states
    from jsae.report.rundir import load_labelled_sae

    if not joint or not layers:
        return {}
    states = token_states(vlm, list(pairs), layers)
    curves = m.get("summary", {}).get("curves", [])  # RunDir.curves's rows, from the metrics read once
    out = {}
    for name in joint:
        for layer in layers:
            sae, labels, _ = load_labelled_sae(run.sae_dir(name, layer))
            feats = browser_features(states.codes(sae, layer), labels, layer, [c for c in curves if c["layer"] == layer],
                                     method=name)
            out[f"{name} · layer {layer}"] = browser_section(f"{name} · layer {layer}", feats)
    return out


__all__ = ["figure_bands", "write_run_report"]
