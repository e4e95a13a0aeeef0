"""Datasets in the MVTec AD folder layout and the built-in demo data."""

from cavga.data.demo import DEFECT_TYPES, DEMO_CATEGORIES, make_demo_data
from cavga.data.folder import (
    IMAGE_EXTENSIONS,
    Sample,
    category_dir,
    has_masks,
    image_array,
    image_to_tensor,
    infer_channels,
    is_grey,
    list_categories,
    list_split,
    load_image,
    load_mask,
    open_image,
    to_float,
    validate_images,
)
from cavga.data.stream import ImageDataset, ImageSource, default_workers, loader, scan
from cavga.data.synthetic import KINDS, perlin_masks, perlin_noise, synthesize
from cavga.data.weak import anomalous_folder, weak_split

__all__ = [
    "DEFECT_TYPES",
    "DEMO_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "ImageDataset",
    "ImageSource",
    "Sample",
    "anomalous_folder",
    "category_dir",
    "default_workers",
    "has_masks",
    "image_array",
    "image_to_tensor",
    "infer_channels",
    "is_grey",
    "list_categories",
    "list_split",
    "load_image",
    "load_mask",
    "loader",
    "make_demo_data",
    "open_image",
    "perlin_masks",
    "perlin_noise",
    "scan",
    "synthesize",
    "to_float",
    "validate_images",
    "weak_split",
]
