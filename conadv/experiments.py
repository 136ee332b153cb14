"""``python -m conadv.experiments``: sweeps of runs and their report
(``conadv/studies/experiments.py``)."""

from conadv.studies.experiments import main

if __name__ == "__main__":
    main()
