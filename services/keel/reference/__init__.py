"""The frozen reference policy: log-probs of trajectories for the KL term."""
