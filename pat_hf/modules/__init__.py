"""Building blocks shared by the distillers: shape projectors, PAT's prompt blocks and region attention."""
