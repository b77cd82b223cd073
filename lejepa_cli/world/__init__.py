"""World models' data: built-in simulated worlds and trajectory datasets.

sim.py (World protocol, options, registry, simulate), render.py (drawing), one module per
world (two_room.py, push.py, balls.py), store.py (the prepared trajectory format),
files.py (reading .npz / HDF5 trajectory files), build.py (writing prepared folders) and
trajectories.py (TrajectoryDataset and its windows). Nothing here imports model code.
"""
