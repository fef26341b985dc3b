"""Ray side: the job driver, the stage tasks, resource routing and the Ray runtime.

Belongs here: running a job (``driver``: claim, stages, publish, every state transition of a job),
the ingest stage that joins the gate to the vault (``ingest``), one Ray task per stage (``tasks``),
routing, the runtime, batch reprocessing and the job metrics.

Does not belong here: how a stage works (``privacy/``, ``reconstruct/``), what data protection
requires (``dataprotection/``: workers call it), HTTP and the CLI (above this layer).
"""
