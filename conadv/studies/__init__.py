"""The paper's studies, rerun: a grid of training runs, and the report of their results.

``grid`` names the runs of a sweep and scales their learning rates;
``runner`` trains them with ``main.py`` (resumably, N at a time);
``hparams`` records each in TensorBoard's HParams dashboard; ``statistics``
and ``report`` turn the runs' ``summary.json`` files into tables and plots.
``conadv-experiments`` (``python -m conadv.studies.experiments``) is the
command; ``commands`` holds the studies' console scripts.
"""
