"""Data: the embedded digits tfds builder and the grain input pipeline (no TensorFlow needed)."""

from jdiff.data.digits import JdiffDigits, digits_builder, prepare_digits
from jdiff.data.pipeline import (DatasetMetadata, TensorFlowRequiredError, dataset_metadata,
                                 load_source, make_eval_iterator, make_train_iterator,
                                 prepared_builder)
