"""World models: action-conditioned LeJEPA (LeWM) on trajectories of frames and actions."""
