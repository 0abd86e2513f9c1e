"""jsae releases: the registry that SAELens's ``SAE.from_pretrained`` reads (:mod:`jsae.releases.registry`),
building releases from a VLM (:mod:`jsae.releases.build`), the hub (:mod:`jsae.releases.hub`) and SAEBench
(:mod:`jsae.releases.saebench`)."""

from jsae.releases.registry import (RECIPES, RELEASES, install, register_release, resolve_sae_id,
                                    saelens_yaml, unregister_release)

__all__ = ["RECIPES", "RELEASES", "install", "register_release", "resolve_sae_id", "saelens_yaml", "unregister_release"]
