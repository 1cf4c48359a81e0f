"""Building blocks of the distillers: shape projectors, PAT's prompt blocks and region attention, and the
baselines' feature grids, grid aligners, branch heads and contrastive memory."""
