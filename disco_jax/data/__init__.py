"""Input data: the one photo reader, image folders as TFDS datasets, the tf.data pipeline."""
