"""Using a trained policy: loading a checkpoint (adapter on its base, or a full policy) and predicting actions in
the robot's units."""
