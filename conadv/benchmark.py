"""``python -m conadv.benchmark``: the step-throughput benchmark
(``conadv/studies/benchmark.py``)."""

from conadv.studies.benchmark import main

if __name__ == "__main__":
    main()
