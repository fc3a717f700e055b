"""Training data: datasets in three layouts, aspect-ratio buckets, the offline feature cache."""

from pixsigma.data.buckets import BucketBatchSampler, aspect_bins, assign_bins, nearest_bin
from pixsigma.data.cache import (
    CachedSource,
    FeatureCache,
    RawSource,
    check_not_stale,
    extract,
    extract_features,
    is_cache,
    load_text_encoder,
    load_vae,
)
from pixsigma.data.datasets import CaptionDataset, Sample, load_image, use_long_caption
