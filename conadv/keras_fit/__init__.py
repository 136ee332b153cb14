"""The machinery behind ``conadv.keras.ConAdvModel``: the Keras model (``model.py``), what
its ``fit`` takes (``data.py``), the state one ``fit`` trains with (``fit_state.py``) and
the callbacks for its evaluation statistics (``batch_norm_callbacks.py``)."""
