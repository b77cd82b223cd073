"""Image data: sources, preparation into shards, loading. Kept import-light: the CLI reads NPZ_KEYS_HELP."""

# The arrays an .npz source may hold (lejepa_cli/data/sources.py `_NPZ_KEYS`), for --help and errors.
NPZ_KEYS_HELP = (".npz keys: training images x_train (or images, or x) with labels y_train (labels, y) if any; "
                 "held-out images x_val or x_test with labels y_val / y_test; images uint8 (N, H, W[, C]) or "
                 "(N, C, H, W), C 1 or 3. Without a held-out array, data.val_fraction (e.g. 0.1) carves one off")
