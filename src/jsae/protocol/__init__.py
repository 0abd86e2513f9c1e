"""The JSAE paper's protocol, one stage per function (:mod:`jsae.protocol.run`): capture → train the
methods (:mod:`jsae.protocol.methods`) → label → choose strengths → steer / suppress cells
(:mod:`jsae.protocol.sweep`) → statistics (:mod:`jsae.protocol.stats`) → report (:mod:`jsae.report`)."""
