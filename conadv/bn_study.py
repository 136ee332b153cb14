"""``python -m conadv.bn_study``: the BatchNorm-statistics study
(``conadv/studies/bn_study.py``)."""

from absl import app

from conadv.studies.bn_study import main

if __name__ == "__main__":
    app.run(main)
