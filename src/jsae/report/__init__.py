"""What people look at, read from a run directory (:mod:`jsae.report.rundir`): markdown and plots
(:mod:`jsae.report.plots`), the feature browser (:mod:`jsae.report.browser`) and the Neuronpedia export
(:mod:`jsae.report.neuronpedia`)."""
