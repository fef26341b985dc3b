"""Ray side: the job graph, resource routing and the Ray runtime. Thin over the stage functions."""
