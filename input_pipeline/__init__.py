"""tf.data input pipelines: every data source behind one interface (``base.DataSource``)."""
