"""The JSAE paper's protocol: the settings (:mod:`jsae.protocol.config`) and the reference code's
(:mod:`jsae.protocol.reference`), one stage per function (:mod:`jsae.protocol.stages`) driven by
:mod:`jsae.protocol.run`: capture → train the methods (:mod:`jsae.protocol.methods`) → label → choose strengths →
steer / suppress cells (:mod:`jsae.protocol.sweep`) → statistics (:mod:`jsae.protocol.stats`) → report
(:mod:`jsae.report`)."""
