"""The parts of ``python -m input_pipeline.convert``: layouts found on disk
(``layouts``), one image made an RGB JPEG (``images``), one shard written or
proved already written (``shards``), shards written by worker processes with a
progress line (``parallel``), the program's flags (``options``)."""
