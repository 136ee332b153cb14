"""The machinery behind ``conadv.keras.ConAdvModel``: the Keras model (``model.py``), what
its ``fit`` takes (``data.py``) and the state one ``fit`` trains with (``fit_state.py``)."""
