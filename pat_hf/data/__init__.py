"""Datasets, transforms and mixing: `datasets` for loading, timm for every transform and for Mixup/CutMix.

Every source is normalised to two columns, `image` and `label`, and a train and an evaluation split: map-style
`datasets.Dataset`s, or with --streaming `datasets.IterableDataset`s read as they are consumed. Nothing is
decoded at start-up: each image is decoded here when its example is drawn, so that an unreadable one is skipped
and counted (or, with --strict-images, stops the run naming it), and every image mode (grey, palette, alpha,
CMYK, 16-bit) becomes 8-bit RGB. Transforms run at each draw, so augmentation differs from epoch to epoch.
"""
