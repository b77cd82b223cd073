"""Image pretraining: the LeJEPA objective over multi-crop views, and what uses its encoders.

objective (the training step and its loss), model (the multi-view encoder and projector wrappers),
views and corruptions (augmentations; the probe's shift table), probe with classifiers, features,
conditions, evaluate and report (frozen-feature evaluation), adapt (label-free adaptation),
embed, selection (label-free checkpoint ranking), plots and viz (figures). Nothing here imports
lejepa_cli.world; the shared core (config, train, checkpoint, dist, sigreg, ...) sits above both.
"""
