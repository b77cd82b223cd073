"""Bounds of numeric options, shared by the commands (their --help states them) and the library
checks behind them. Torch-free, so `lejepa --help` stays fast."""

MAX_EPOCHS = 1000  # linear-probe epochs: 40 is the protocol; more only costs time
MIN_TRAIN = 2  # the linear probe carves its validation part from the train images: one each at least
MAX_PCA_IMAGES = 32  # images in one PCA-map figure (lejepa viz): more is unreadable and took minutes to draw
