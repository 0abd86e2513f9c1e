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
    from its directory (:class:`jsae.report.rundir.RunDir`) after its ``metrics.json`` is written."""
    from jsae.files import write_atomic
    from jsae.report.browser import browser_features, feature_browser, token_states
    from jsae.report.markdown import protocol_report
    from jsae.report.plots import plot_dose_response
    from jsae.report.rundir import METHOD_INFO, load_labelled_sae

    m = run.metrics()
    pos, bands, sup_pos, sup_bands = figure_bands(m)
    if bands:
        plot_dose_response(bands, m["n_layers"], run.path / "dose_response.png",
                           title=f"{m['model']}: steering at {pos}, suppression at {sup_pos or '–'} (means over concepts; "
                                 "the other position sets are in report.md)",
                           xlabel="absolute α" if m.get("config", {}).get("alphas") else
                           "strength (× mean per-token image-state norm)",
                           suppression=sup_bands)
    layers = m["layers"]
    joint = [name for name in m.get("methods", ["jsae"]) if name in METHOD_INFO and METHOD_INFO[name].joint
             and all(run.sae_dir(name, L).is_dir() for L in layers)]
    states = token_states(vlm, list(pairs[:n_browser_pairs]), layers)
    sections = {}
    for name in joint:
        for layer in layers:
            sae, labels, _ = load_labelled_sae(run.sae_dir(name, layer))
            sections[f"{name} · layer {layer}"] = browser_features(states.codes(sae, layer), labels, layer,
                                                                  run.curves(layer=layer), method=name)
    feature_browser(sections, run.path / "features.html",
                    title=f"{m['model']}: features of every joint SAE of the run (saes/<method>/layer_<L>)")
    write_atomic(run.path / "report.md", protocol_report(m))


__all__ = ["figure_bands", "write_run_report"]
