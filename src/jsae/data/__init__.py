"""Data sources: the embedded world or a caption dataset, with splits, pairs, concept presence, the judge
and a fingerprint (:mod:`jsae.data.sources`, :mod:`jsae.data.judges`); synthetic paired activations with
known ground truth (:mod:`jsae.protocol.synthetic`)."""
