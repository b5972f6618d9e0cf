"""Datasets of real images (fine-tuning): captioned image folders, JSONL manifests, aspect-ratio buckets."""
from glmimage.data.folder import BucketBatches, Item, buckets, load_items, load_resized, nearest_bucket

__all__ = ["Item", "load_items", "buckets", "nearest_bucket", "load_resized", "BucketBatches"]
