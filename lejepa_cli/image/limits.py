"""Bounds of numeric options, shared by the commands (their --help states them) and the library
checks behind them. Torch-free, so `lejepa --help` stays fast."""

MAX_EPOCHS = 500  # linear-probe epochs: 40 is the protocol and the probe has long converged by 500
MIN_TRAIN = 2  # the linear probe carves its validation part from the train images: one each at least
MAX_PCA_IMAGES = 16  # images in one PCA-map figure (lejepa viz): 500 took over 10 minutes to draw, unreadably
MAX_ADAPT_STEPS = 100_000  # lejepa adapt --steps: a label-free touch-up, not a pretraining run (10^12 never ended)
