"""Data: the embedded digits tfds builder, dataset sources, the grain input pipeline and the
latent codec with its data source (no TensorFlow needed)."""

from jdiff.data.digits import JdiffDigits, digits_builder, prepare_digits
from jdiff.data.latents import LatentCodec, LatentSource, encode_source
from jdiff.data.pipeline import make_eval_iterator, make_train_iterator
from jdiff.data.sources import (
  DatasetMetadata,
  TensorFlowRequiredError,
  dataset_metadata,
  load_source,
  prepared_builder,
)
