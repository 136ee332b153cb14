"""The studies' console scripts (``setup.py``): ``conadv-benchmark``,
``conadv-experiments`` and ``conadv-bn-study``, the same programs as
``python -m conadv.studies.benchmark``, ``… .experiments`` and ``… .bn_study``.

A console script passes what its function returns to ``sys.exit``, which
takes anything but ``None`` or an integer for an error; the benchmark's and
the sweep's ``main`` return their results (for tests and notebooks), so each
script here runs its program on ``sys.argv`` and returns nothing.
"""


def benchmark():
    """Console script ``conadv-benchmark``."""
    from conadv.studies import benchmark as program

    program.main()


def experiments():
    """Console script ``conadv-experiments``."""
    from conadv.studies import experiments as program

    program.main()


def bn_study():
    """Console script ``conadv-bn-study``."""
    from conadv.studies import bn_study as program

    program.run()
