"""Ray layer: rollout actors, trainer group, weight sync, reward pool, driver."""
