"""World models: action-conditioned LeJEPA (LeWM) on trajectories of frames and actions.

Data (nothing here imports model code): sim.py (World protocol, options, registry, simulate),
render.py (drawing), one module per world (two_room.py, push.py, balls.py), store.py (the
prepared trajectory format), files.py (reading .npz / HDF5 trajectory files), build.py
(writing prepared folders) and trajectories.py (TrajectoryDataset and its windows).
Model and training: model.py (encoder, action encoder, predictor), loss.py (the world
objective), objective.py (what the shared training loop runs), export.py (artefacts and
`load_world_model`).
Use (`lejepa world plan | probe | surprise | stress`): use.py (a run with its simulator), plan.py
(CEM planning; its settings, torch-free, in plan_settings.py), probe.py (state probes), surprise.py (injected events, AUROC), stress.py
(deployment conditions at graded levels), reproduce.py (world recipes of `lejepa reproduce`).
"""
